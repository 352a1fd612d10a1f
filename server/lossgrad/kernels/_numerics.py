"""Shared kernel machinery: decorators, float-generic vectorisable math, block sums.

Drivers are compiled for exactly float32 and float64 predictions (no per-call
compilation) by :func:`compile_kernels`, which the engine runs before its first call (and
``warmup`` at server start), not at import, so a server answers health probes while its
kernels compile; with ``nogil=True`` so gRPC worker threads run kernels side by side,
``cache=True`` so a warm cache makes start-up fast, and ``error_model="numpy"`` so a
division never raises. Element math runs in the predictions' float type with
hand-written exp/log (PyPI's llvmlite has no SVML, so ``math.exp`` in a loop is a scalar
libm call that blocks vectorisation); every sum is accumulated in float64 over fixed
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


@numba.njit(nogil=True, error_model="numpy", fastmath={"reassoc"})
def block_sum(v):  # type: ignore[no-untyped-def]
    """float64 sum of one block. Re-association lets LLVM vectorise it; the order is
    fixed by the compiled code, so the same block always gives the same bits."""
    s = 0.0
    for i in range(v.size):
        s += v[i]
    return s


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


f32_bits = _bitcast(True, 32)
bits_f32 = _bitcast(False, 32)
f64_bits = _bitcast(True, 64)
bits_f64 = _bitcast(False, 64)


# --- exp and log: Cody-Waite reduction + polynomial, branch-free so loops vectorise -------
# Within 3 ulp of their float type (checked against NumPy in tests/test_math.py), with
# IEEE results for 0, Inf and NaN.

_LN2_HI_64 = 6.93147180369123816490e-01
_LN2_LO_64 = 1.90821492927058770002e-10
_LN2_HI_32 = 0.693359375
_LN2_LO_32 = -2.12194440e-4
_LOG2E = 1.4426950408889634
_SQRT2 = 1.4142135623730951


# Polynomial coefficients, highest power first, for ``_horner``: e^r's Taylor series to
# r^13 (float64), and atanh's series sum z^k / (2k + 1).
_EXP_TAYLOR_64 = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))
# float32: degree 6 on |r| <= ln2 / 2, fitted for the smallest largest relative error with
# the constant term held at 1 (so e^0 is exactly 1): 2e-9, 0.9 ulp once evaluated in float32
# steps, one step fewer than the Taylor series to r^7.
_EXP_MINIMAX_32 = (0.0013843603617581725, 0.008374196405918521, 0.04166800482896322,
                   0.1666643078837802, 0.49999994190906083, 1.0000000322622677, 1.0)
_ATANH_SERIES_64 = tuple(1.0 / (2 * k + 1) for k in range(10, -1, -1))


def _horner_steps(x, coeffs):  # type: ignore[no-untyped-def]
    """sum_k coeffs[k] x^(n-1-k) in the float type of x, one fused multiply-add a step."""
    p = fconst(x, coeffs[0])
    for k in range(1, len(coeffs)):
        p = fma(x, p, fconst(x, coeffs[k]))
    return p


_horner = numba.njit(error_model="numpy")(_horner_steps)
_ROUND_64 = 6755399441055744.0  # 1.5 * 2^52: x + this - this rounds x to an integer
_ROUND_32 = 12582912.0  # 1.5 * 2^23


def _exp64_reduced(xc):  # type: ignore[no-untyped-def]
    """(e^r, k) with xc = k ln2 + r, |r| <= ln2 / 2 (Taylor to r^13: < 1 ulp)."""
    kf = (xc * _LOG2E + _ROUND_64) - _ROUND_64
    r = xc - kf * _LN2_HI_64 - kf * _LN2_LO_64
    return _horner(r, _EXP_TAYLOR_64), kf


def _exp32_reduced(xc):  # type: ignore[no-untyped-def]
    """(e^r, k) with xc = k ln2 + r, |r| <= ln2 / 2 (about; any integer k near xc / ln2
    does), each reduction step one fused multiply-add (kf ln2_hi is exact anyway)."""
    kf = fma(xc, np.float32(_LOG2E), np.float32(_ROUND_32)) - np.float32(_ROUND_32)
    r = fma(kf, np.float32(-_LN2_LO_32), fma(kf, np.float32(-_LN2_HI_32), xc))
    return _horner(r, _EXP_MINIMAX_32), kf


_exp64_red = numba.njit(error_model="numpy")(_exp64_reduced)
_exp32_red = numba.njit(error_model="numpy")(_exp32_reduced)


def _exp64_nonpositive(x):  # type: ignore[no-untyped-def]
    xc = -708.5 if x < -708.5 else x
    p, kf = _exp64_red(xc)
    res = p * bits_f64(f64_bits(kf + (_ROUND_64 + 1023.0)) << 52)
    res = 0.0 if x < -708.3964185322641 else res
    return x if x != x else res


def _exp32_nonpositive(x):  # type: ignore[no-untyped-def]
    xc = np.float32(-87.34) if x < np.float32(-87.34) else x
    p, kf = _exp32_red(xc)
    res = p * bits_f32(f32_bits(kf + np.float32(_ROUND_32 + 127.0)) << 23)
    res = np.float32(0.0) if x < np.float32(-87.33654) else res
    return x if x != x else res


def _log64(x):  # type: ignore[no-untyped-def]
    tiny = x < 2.2250738585072014e-308
    xs = x * 18014398509481984.0 if tiny else x  # 2^54 lifts subnormals
    bits = f64_bits(xs)
    e = ((bits >> 52) & 0x7FF) - 1023 - (54 if tiny else 0)
    m = bits_f64((bits & 0xFFFFFFFFFFFFF) | (1023 << 52))
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = _horner(z, _ATANH_SERIES_64)
    ef = np.float64(e)
    res = ef * _LN2_HI_64 + (2.0 * s * p + ef * _LN2_LO_64)
    res = -math.inf if x == 0.0 else res
    res = math.nan if x < 0.0 else res
    res = x if x == math.inf else res
    return x if x != x else res


# log(1 + f) = f + f^2 (f P(f) - 1/2) on [sqrt(1/2) - 1, sqrt(2) - 1]: P of degree 6 (highest
# power first), fitted for the smallest largest relative error (3e-8). No division, unlike
# atanh forms.
_LOG1P_P32 = (0.08700318065228, -0.14267470496301832, 0.14914797587290474,
              -0.16577586734955965, 0.19963061454736367, -0.2500133700456189,
              0.33333910787912635)


def _log1p_reduced32(f):  # type: ignore[no-untyped-def]
    """log(1 + f) for f in the polynomial's range, each step after P one fused multiply-add."""
    return fma(f * f, fma(f, _horner(f, _LOG1P_P32), np.float32(-0.5)), f)


_log1p_red32 = numba.njit(error_model="numpy")(_log1p_reduced32)


def _log32(x):  # type: ignore[no-untyped-def]
    tiny = x < np.float32(1.17549435e-38)
    xs = x * np.float32(16777216.0) if tiny else x  # 2^24 lifts subnormals
    bits = f32_bits(xs)
    e = ((bits >> 23) & 0xFF) - 127 - (24 if tiny else 0)
    m = bits_f32((bits & 0x7FFFFF) | (127 << 23))
    big = m > np.float32(_SQRT2)
    m = m * np.float32(0.5) if big else m
    e = e + 1 if big else e
    ef = np.float32(e)
    res = ef * np.float32(_LN2_HI_32) + (_log1p_red32(m - np.float32(1.0))
                                          + ef * np.float32(_LN2_LO_32))
    res = np.float32(-np.inf) if x == np.float32(0.0) else res
    res = np.float32(np.nan) if x < np.float32(0.0) else res
    res = x if x == np.float32(np.inf) else res
    return x if x != x else res


def flog(x: float) -> float:
    """log(x) in the float type of x, vectorisable; log(0) = -inf."""
    return math.log(x)


def fexp_nonpositive(x: float) -> float:
    """e^x for x <= 0 (softmax and softplus tails) in the float type of x, vectorisable;
    results below the smallest normal number are flushed to 0."""
    return math.exp(x)


@overload(fexp_nonpositive)
def _fexp_nonpositive(x):  # type: ignore[no-untyped-def]
    return _exp32_nonpositive if x == nt.float32 else _exp64_nonpositive


@overload(flog)
def _flog(x):  # type: ignore[no-untyped-def]
    return _log32 if x == nt.float32 else _log64


def _log1p_unit64(u):  # type: ignore[no-untyped-def]
    w = 1.0 + u
    d = w - 1.0
    return u if d == 0.0 else flog(w) + (u - d) / w  # the rounding of 1 + u corrected


def _log1p_unit32(u):  # type: ignore[no-untyped-def]
    # f = u, or (1 + u) / 2 - 1 = (u - 1) / 2 above sqrt(2) - 1: both exact enough, and in
    # the polynomial's range, so there is no division and no bit manipulation.
    big = u > np.float32(_SQRT2 - 1.0)
    res = _log1p_red32(fma(u, np.float32(0.5), np.float32(-0.5)) if big else u)
    return res + np.float32(_LN2_HI_32 + _LN2_LO_32) if big else res


def flog1p_unit(u: float) -> float:
    """log(1 + u) for u in [0, 1] (softplus tails), accurate for small u."""
    return math.log1p(u)


@overload(flog1p_unit)
def _flog1p_unit(u):  # type: ignore[no-untyped-def]
    return _log1p_unit32 if u == nt.float32 else _log1p_unit64


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
def clog(v):  # type: ignore[no-untyped-def]
    """(log v floored at -100, its derivative): 1/v where the floor is not active, else 0.

    1/v is saturated at the largest finite value: in float32 it overflows below
    v ~ 2.9e-39, above the floor, and a term weighted 0 (a zero target) must stay 0,
    not 0 * inf = NaN."""
    lv = flog(v)
    floor = fconst(v, LOG_FLOOR)
    active = not (lv <= floor)  # NaN stays NaN
    return (lv if active else floor), (saturate(fconst(v, 1.0) / v, v) if active
                                       else fconst(v, 0.0))


@inline
def poison(v):  # type: ignore[no-untyped-def]
    """0 for a finite v, NaN for NaN and +-Inf (v - v). Added to a loss, it makes the sum
    non-finite exactly when an input is, so valid requests need no separate check pass."""
    return v - v


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
