"""Shared kernel machinery: decorators, float-generic vectorisable math, block sums.

Drivers are compiled for exactly float32 and float64 predictions (no per-call
compilation) by :func:`compile_kernels`, which the engine runs before its first call (and
``warmup`` at server start), not at import, so a server answers health probes while its
kernels compile; with ``nogil=True`` so gRPC worker threads run kernels side by side,
``cache=True`` so a warm cache makes start-up fast, and ``error_model="numpy"`` so a
division never raises. Element math runs in the predictions' float type with
hand-written exp/log (``_explog``: PyPI's llvmlite has no SVML, so ``math.exp`` in a loop
is a scalar libm call that blocks vectorisation); every sum is accumulated in float64 over fixed
blocks that are added in block order, so the bits depend only on the inputs, never on the
thread count.

Invalid inputs (NaN/Inf, probabilities outside [0, 1]) poison the loss with NaN on the
way, so a valid request costs no extra pass: only a non-finite sum sends the engine to
look for the offending value.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types as nt
from numba.extending import intrinsic, overload

BLOCK = 4096  # positions (elements, or C-element rows' worth) per block
PARALLEL_MIN = 65536  # elements; below this a call runs serially (prange costs a few µs)
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


# Kernels declared by ``kernel`` and not compiled yet, with their signatures.
_PENDING: list[tuple[Any, list[Any]]] = []
_COMPILE_LOCK = threading.Lock()


def kernel(signature: Callable[[Any], Any], parallel: bool = False) -> Callable[..., Any]:
    """Declare ``fn`` for each float type ``F`` given to ``signature(F)``; it is compiled
    for those signatures only, by :func:`compile_kernels`."""

    def wrap(fn: Callable[..., Any]) -> Any:
        dispatcher = numba.njit(nogil=True, cache=True, error_model="numpy",
                                parallel=parallel)(fn)
        _PENDING.append((dispatcher, [signature(F) for F in FLOATS]))
        return dispatcher

    return wrap


def compile_kernels() -> None:
    """Compile (or load from numba's cache) every declared kernel for its signatures,
    then refuse others, as ``numba.njit(signatures)`` does at import. Thread-safe; a
    no-op once done."""
    if not _PENDING:
        return
    with _COMPILE_LOCK:
        while _PENDING:
            dispatcher, sigs = _PENDING[0]
            for sig in sigs:
                dispatcher.compile(sig)
            dispatcher.disable_compile()
            _PENDING.pop(0)


def inline(fn: Callable[..., Any]) -> Any:
    """Per-element or per-row math: small functions that LLVM inlines into their loops."""
    return numba.njit(nogil=True, error_model="numpy")(fn)


def loop(fn):  # type: ignore[no-untyped-def]
    """A loop generic over the loss function it is given. Inlined into its caller while
    numba types the code, so the loss function is a compile-time constant: the loop is
    specialised per loss (and vectorised), and the driver stays cacheable."""
    return numba.njit(inline="always", error_model="numpy")(fn)


# --- float-generic constants and bit casts ----------------------------------------------

def fconst(like: Any, value: float) -> Any:
    """``value`` in the float type of ``like`` (an array or a scalar)."""
    return value


@overload(fconst)
def _fconst(like, value):  # type: ignore[no-untyped-def]
    ty = like.dtype if isinstance(like, nt.Array) else like
    if ty == nt.float32:
        return lambda like, value: np.float32(value)
    return lambda like, value: np.float64(value)


def _bitcast(to_int: bool, width: int) -> Any:
    float_ty = {32: nt.float32, 64: nt.float64}[width]
    int_ty = {32: nt.int32, 64: nt.int64}[width]

    def typer(typingctx, v):  # type: ignore[no-untyped-def]
        if to_int and v == float_ty:
            def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
                return builder.bitcast(args[0], ir.IntType(width))
            return int_ty(v), codegen
        if not to_int and isinstance(v, nt.Integer):
            def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
                val = args[0]
                if v.bitwidth > width:
                    val = builder.trunc(val, ir.IntType(width))
                elif v.bitwidth < width:
                    val = builder.sext(val, ir.IntType(width))
                llty = ir.FloatType() if width == 32 else ir.DoubleType()
                return builder.bitcast(val, llty)
            return float_ty(v), codegen
        return None

    return intrinsic(typer)


@intrinsic
def maxnum(typingctx, a, b):  # type: ignore[no-untyped-def]
    """max(a, b) as LLVM's ``maxnum``: NaN loses to a number. Unlike a compare-and-select,
    a running maxnum vectorises without fast-math flags."""
    if isinstance(a, nt.Float) and a == b:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            ty = args[0].type
            fnty = ir.FunctionType(ty, [ty, ty])
            fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], fnty)
            return builder.call(fn, args)
        return a(a, b), codegen
    return None


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a * b + c rounded once (LLVM's ``fma``): the same bits wherever it is inlined, unlike
    contraction left to the compiler; one instruction on CPUs with FMA, and it vectorises."""
    if isinstance(a, nt.Float) and a == b == c:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.fma(*args)
        return a(a, b, c), codegen
    return None


@intrinsic
def sum_add(typingctx, s, v):  # type: ignore[no-untyped-def]
    """s + float64(v) for a running float64 sum, the one add allowed to re-associate:
    LLVM may then vectorise a loop's sum of it, while the rest of the loop's arithmetic
    keeps its exact IEEE steps (unlike ``fastmath`` on the whole function). The order is
    fixed by the compiled code only in a loop that stores nothing: LLVM guards a loop
    that stores with a check of where its arrays lie, and falls back to the scalar loop,
    which adds in another order."""
    if s == nt.float64 and isinstance(v, nt.Float):
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            term = context.cast(builder, args[1], v, nt.float64)
            return builder.fadd(args[0], term, flags=("reassoc",))
        return nt.float64(s, v), codegen
    return None


@numba.njit(nogil=True, error_model="numpy")
def block_sum(v):  # type: ignore[no-untyped-def]
    """float64 sum of one block (``sum_add``: vectorised, in an order fixed by the
    compiled code, so the same block always gives the same bits)."""
    s = 0.0
    for i in range(v.size):
        s = sum_add(s, v[i])
    return s


f32_bits = _bitcast(True, 32)
bits_f32 = _bitcast(False, 32)
f64_bits = _bitcast(True, 64)
bits_f64 = _bitcast(False, 64)


@inline
def sign(v):  # type: ignore[no-untyped-def]
    """sign(v) with sign(0) = 0 (the subgradient used at kinks)."""
    one = fconst(v, 1.0)
    return one if v > fconst(v, 0.0) else (-one if v < fconst(v, 0.0) else fconst(v, 0.0))


def flargest(like: Any) -> float:
    """The largest finite value of ``like``'s float type."""
    return float(np.finfo(np.float64).max)


@overload(flargest)
def _flargest(like):  # type: ignore[no-untyped-def]
    ty = like.dtype if isinstance(like, nt.Array) else like
    if ty == nt.float32:
        return lambda like: np.float32(3.4028234663852886e38)
    return lambda like: np.float64(1.7976931348623157e308)


@inline
def saturate(v, like):  # type: ignore[no-untyped-def]
    """v clamped to the finite range of ``like``'s float type: a float32 gradient of a
    probability input overflows below p ~ 3e-39, where the log is still above its floor."""
    big = flargest(like)
    v = big if v > big else v
    return -big if v < -big else v  # NaN stays NaN


@inline
def clip(v, lo, hi):  # type: ignore[no-untyped-def]
    """v clamped to [lo, hi] (NaN stays NaN): the Hessian modes are bounds on h."""
    v = lo if v < lo else v
    return hi if v > hi else v


@inline
def poison(v):  # type: ignore[no-untyped-def]
    """0 for a finite v, NaN for NaN and +-Inf (v - v). Added to a loss, it makes the sum
    non-finite exactly when an input is, so valid requests need no separate check pass."""
    return v - v


@inline
def nonfinite(v):  # type: ignore[no-untyped-def]
    """Whether v is NaN or +-Inf, as a bool to count: a loop's count of them vectorises,
    where a float sum of ``poison`` would not (and would need scratch)."""
    return (v - v) != fconst(v, 0.0)


@inline
def outside_unit(v):  # type: ignore[no-untyped-def]
    """Whether v is outside [0, 1] or NaN (``unit_poison`` as a bool to count)."""
    return not ((v >= fconst(v, 0.0)) & (v <= fconst(v, 1.0)))


@inline
def vector_poison(x):  # type: ignore[no-untyped-def]
    """NaN when x holds a NaN or +-Inf, else 0: ``poison`` over a whole vector."""
    bad = 0
    for k in range(x.size):
        bad += nonfinite(x[k])
    return math.nan if bad else 0.0


@inline
def unit_poison(v):  # type: ignore[no-untyped-def]
    """0 for v in [0, 1], NaN otherwise (and for NaN): marks a bad probability."""
    inside = (v >= fconst(v, 0.0)) & (v <= fconst(v, 1.0))
    return fconst(v, 0.0) if inside else fconst(v, np.nan)


# --- input checks on the slow path: locate the first bad value -----------------------------

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


@numba.njit(nt.Tuple((i8, f8, f8, i8))(In(f8), i8, f8, f8), nogil=True, cache=True)
def weight_stats(w, offset, total, acc):  # type: ignore[no-untyped-def]
    """(first index that is negative or non-finite or -1, total, acc, non-zeros).

    The sum runs in a fixed order over blocks of BLOCK positions aligned to absolute
    positions: ``w`` starts at position ``offset``, ``total`` holds the finished blocks
    before it and ``acc`` the unfinished block's part. The sum is ``total + acc``; the
    same whether the weights come in one call or in consecutive pieces.
    """
    count = 0
    n = w.size
    k = 0
    while k < n:
        end = min(n, k + BLOCK - (offset + k) % BLOCK)
        for j in range(k, end):
            v = w[j]
            if not (v >= 0.0 and math.isfinite(v)):
                return j, 0.0, 0.0, 0
            acc += v
            if v > 0.0:
                count += 1
        if (offset + end) % BLOCK == 0:
            total += acc
            acc = 0.0
        k = end
    return -1, total, acc, count
