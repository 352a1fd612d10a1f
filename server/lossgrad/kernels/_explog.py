"""Hand-written exp and log for the kernels' loops: Cody-Waite reduction and a polynomial,
branch-free, so loops that call them vectorise (PyPI's llvmlite has no SVML: ``math.exp``
in a loop is a scalar libm call). Each works in the float type of its argument; ``clog``
is the floored log of probability losses."""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types as nt
from numba.extending import overload

from ._numerics import (
    LOG_FLOOR,
    bits_f32,
    bits_f64,
    f32_bits,
    f64_bits,
    fconst,
    fma,
    inline,
    saturate,
)

# --- exp and log: Cody-Waite reduction + polynomial, branch-free so loops vectorise -------
# Within 3 ulp of their float type (checked against NumPy in tests/test_math.py), with
# IEEE results for 0, Inf and NaN.

_LN2_HI_64 = 6.93147180369123816490e-01
_LN2_LO_64 = 1.90821492927058770002e-10
_LN2_HI_32 = 0.693359375
_LN2_LO_32 = -2.12194440e-4
_LOG2E = 1.4426950408889634
_SQRT2 = 1.4142135623730951


# Polynomial coefficients, highest power first, for ``polynomial``: e^r's Taylor series to
# r^13 (float64), and atanh's series sum z^k / (2k + 1).
_EXP_TAYLOR_64 = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))
# float32: degree 6 on |r| <= ln2 / 2, fitted for the smallest largest relative error with
# the constant term held at 1 (so e^0 is exactly 1): 2e-9, 0.9 ulp once evaluated in float32
# steps, one step fewer than the Taylor series to r^7.
_EXP_MINIMAX_32 = (0.0013843603617581725, 0.008374196405918521, 0.04166800482896322,
                   0.1666643078837802, 0.49999994190906083, 1.0000000322622677, 1.0)
_ATANH_SERIES_64 = tuple(1.0 / (2 * k + 1) for k in range(10, -1, -1))


def polynomial(coeffs):  # type: ignore[no-untyped-def]
    """A jitted p(x) = sum_k coeffs[k] x^(n-1-k) in the float type of x: Horner's steps
    (one fused multiply-add each), written out as a chain of small functions rather than
    a loop over the coefficients. LLVM vectorises innermost loops only, so an element loop
    that calls a polynomial stays scalar when the polynomial is a loop LLVM does not
    unroll (float64 exp's 14 terms: 15 ns an element against 0.45 ns)."""
    first = coeffs[0]
    p = numba.njit(error_model="numpy")(lambda x: fconst(x, first))
    for c in coeffs[1:]:
        p = _horner_step(p, c)
    return p


def _horner_step(inner, c):  # type: ignore[no-untyped-def]
    @numba.njit(error_model="numpy")
    def step(x):  # type: ignore[no-untyped-def]
        return fma(x, inner(x), fconst(x, c))
    return step


_exp_taylor_64 = polynomial(_EXP_TAYLOR_64)
_exp_minimax_32 = polynomial(_EXP_MINIMAX_32)
_atanh_series_64 = polynomial(_ATANH_SERIES_64)

_ROUND_64 = 6755399441055744.0  # 1.5 * 2^52: x + this - this rounds x to an integer
_ROUND_32 = 12582912.0  # 1.5 * 2^23


def _exp64_reduced(xc):  # type: ignore[no-untyped-def]
    """(e^r, k) with xc = k ln2 + r, |r| <= ln2 / 2 (Taylor to r^13: < 1 ulp)."""
    kf = (xc * _LOG2E + _ROUND_64) - _ROUND_64
    r = xc - kf * _LN2_HI_64 - kf * _LN2_LO_64
    return _exp_taylor_64(r), kf


def _exp32_reduced(xc):  # type: ignore[no-untyped-def]
    """(e^r, k) with xc = k ln2 + r, |r| <= ln2 / 2 (about; any integer k near xc / ln2
    does), each reduction step one fused multiply-add (kf ln2_hi is exact anyway)."""
    kf = fma(xc, np.float32(_LOG2E), np.float32(_ROUND_32)) - np.float32(_ROUND_32)
    r = fma(kf, np.float32(-_LN2_LO_32), fma(kf, np.float32(-_LN2_HI_32), xc))
    return _exp_minimax_32(r), kf


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
    p = _atanh_series_64(z)
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
_log1p_p32 = polynomial(_LOG1P_P32)


def _log1p_reduced32(f):  # type: ignore[no-untyped-def]
    """log(1 + f) for f in the polynomial's range, each step after P one fused multiply-add."""
    return fma(f * f, fma(f, _log1p_p32(f), np.float32(-0.5)), f)


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
