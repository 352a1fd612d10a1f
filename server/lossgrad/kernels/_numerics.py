"""Shared kernel machinery: the decorator, signatures, stable math, block sums, checks.

Every kernel is compiled eagerly for float32 and float64 predictions (no per-call
compilation), with ``nogil=True`` so gRPC worker threads run kernels in parallel,
``cache=True`` so a warm cache makes start-up fast, and ``error_model="numpy"`` so a
division never raises. Element math is done in float64 and every sum accumulates in
float64 over fixed blocks of ``BLOCK`` positions, added in order: the result depends
only on the inputs, never on timing or thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
from numba import types as nt

BLOCK = 4096
LOG_FLOOR = -100.0  # PyTorch's floor for log-probabilities (BCELoss)

f8 = nt.float64
i8 = nt.int64
b1 = nt.boolean
FLOATS = (nt.float32, nt.float64)


def In(dtype: Any, ndim: int = 1) -> nt.Array:  # noqa: N802 - reads like a type
    """A read-only C-contiguous array parameter (writable arrays convert to it)."""
    return nt.Array(dtype, ndim, "C", readonly=True)


def Out(dtype: Any, ndim: int = 1) -> nt.Array:  # noqa: N802
    """A writable C-contiguous array parameter."""
    return nt.Array(dtype, ndim, "C")


def kernel(signature: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Any]:
    """Compile ``fn`` eagerly for each float type ``F`` given to ``signature(F)``."""

    def wrap(fn: Callable[..., Any]) -> Any:
        sigs = [signature(F) for F in FLOATS]
        return numba.njit(sigs, nogil=True, cache=True, error_model="numpy")(fn)

    return wrap


def inline(fn: Callable[..., Any]) -> Any:
    """Per-element math, inlined into the kernels that call it."""
    return numba.njit(inline="always", error_model="numpy")(fn)


@inline
def clog(v: float) -> float:
    """log(v) floored at -100, as PyTorch's BCELoss; log(0) gives -100."""
    if v <= 0.0:
        return LOG_FLOOR
    return max(math.log(v), LOG_FLOOR)


@inline
def clog_grad(v: float) -> float:
    """Derivative of ``clog``: 1/v where the floor is not active, else 0."""
    if v <= 0.0 or math.log(v) <= LOG_FLOOR:
        return 0.0
    return 1.0 / v


@inline
def softplus(v: float) -> float:
    """log(1 + e^v) without overflow."""
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


@inline
def sigmoid(v: float) -> float:
    """1 / (1 + e^-v) without overflow."""
    if v >= 0.0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


@inline
def sign(v: float) -> float:
    """sign(v) with sign(0) = 0 (the subgradient used at kinks)."""
    if v > 0.0:
        return 1.0
    if v < 0.0:
        return -1.0
    return 0.0


# --- input checks: one pass each, returning the first bad flat index or -1 ----------

@kernel(lambda F: i8(In(F)))
def first_nonfinite(a):  # type: ignore[no-untyped-def]
    for k in range(a.size):
        if not math.isfinite(a[k]):
            return k
    return -1


@kernel(lambda F: i8(In(F), f8, f8))
def first_outside(a, lo, hi):  # type: ignore[no-untyped-def]
    """First index with a value below lo or above hi (NaN passes: checked elsewhere)."""
    for k in range(a.size):
        v = a[k]
        if v < lo or v > hi:
            return k
    return -1


@numba.njit(nt.Tuple((i8, f8, i8))(In(f8)), nogil=True, cache=True)
def weight_stats(w):  # type: ignore[no-untyped-def]
    """(first index that is negative or non-finite or -1, fixed-order sum, non-zeros)."""
    total = 0.0
    count = 0
    n = w.size
    for lo in range(0, n, BLOCK):
        acc = 0.0
        for k in range(lo, min(lo + BLOCK, n)):
            v = w[k]
            if not (v >= 0.0 and math.isfinite(v)):
                return k, 0.0, 0
            acc += v
            if v > 0.0:
                count += 1
        total += acc
    return -1, total, count
