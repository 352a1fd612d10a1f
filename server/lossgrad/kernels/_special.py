"""Float-generic math for the extended catalog: exp of any sign, log1p of any non-negative
value, powers, and the series cut-offs of log cosh and tanh.

Like ``_explog``, everything is branch-free (selects, no libm calls), so the loops that
inline these functions vectorise; each runs in the float type of its argument.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import types as nt
from numba.extending import overload

from ._explog import _ROUND_32, _ROUND_64, _exp32_red, _exp64_red, flog
from ._numerics import bits_f32, bits_f64, f32_bits, f64_bits, fconst, inline

_EXP64_MAX = 709.782712893384  # log of the largest float64
_EXP32_MAX = 88.72283905206835  # log of the largest float32


def _exp64(x):  # type: ignore[no-untyped-def]
    # 2^k is built in the exponent field; k = 1024 (the top of the range) does not fit, so
    # there the mantissa takes one factor 2.
    xc = -708.5 if x < -708.5 else (_EXP64_MAX if x > _EXP64_MAX else x)
    p, kf = _exp64_red(xc)
    top = kf > 1000.0
    scale = bits_f64(f64_bits((kf - 1.0 if top else kf) + (_ROUND_64 + 1023.0)) << 52)
    res = (p * 2.0 if top else p) * scale
    res = 0.0 if x < -708.3964185322641 else res
    res = math.inf if x > _EXP64_MAX else res
    return x if x != x else res


def _exp32(x):  # type: ignore[no-untyped-def]
    xc = np.float32(-87.34) if x < np.float32(-87.34) else (
        np.float32(_EXP32_MAX) if x > np.float32(_EXP32_MAX) else x)
    p, kf = _exp32_red(xc)
    top = kf > np.float32(120.0)
    scale = bits_f32(f32_bits((kf - np.float32(1.0) if top else kf)
                              + np.float32(_ROUND_32 + 127.0)) << 23)
    res = (p * np.float32(2.0) if top else p) * scale
    res = np.float32(0.0) if x < np.float32(-87.33654) else res
    res = np.float32(np.inf) if x > np.float32(_EXP32_MAX) else res
    return x if x != x else res


def fexp(x: float) -> float:
    """e^x for any x in the float type of x, vectorisable (within 3 ulp; overflow gives
    +inf, results below the smallest normal number are flushed to 0)."""
    return math.exp(x)


@overload(fexp)
def _fexp(x):  # type: ignore[no-untyped-def]
    return _exp32 if x == nt.float32 else _exp64


@inline
def flog1p(v):  # type: ignore[no-untyped-def]
    """log(1 + v) for v >= 0 of any size: the log of the rounded 1 + v, corrected by the
    rounding error (v - ((1 + v) - 1)) / (1 + v), so small v keep full precision."""
    w = fconst(v, 1.0) + v
    d = w - fconst(v, 1.0)
    return v if d == fconst(v, 0.0) else flog(w) + (v - d) / w


def log1p_diff_of(u: float, v: float, like: Any) -> float:
    """log(1 + u) - log(1 + v) in float64 for u, v >= 1e-7 holding values of ``like``'s
    float type. For float32 values 1 + u and 1 + v are exact in float64 (below 2^53), so it
    is one log of their quotient: half the logs, and an error of a few float64 ulps of 1
    whatever the size of u and v, where two logs err by their own magnitude's ulps. For
    float64 values, ``flog1p`` of each."""
    return math.log1p(u) - math.log1p(v)


@overload(log1p_diff_of)
def _log1p_diff_of(u, v, like):  # type: ignore[no-untyped-def]
    if like == nt.float32:
        return lambda u, v, like: flog((1.0 + u) / (1.0 + v))
    return lambda u, v, like: flog1p(u) - flog1p(v)


@inline
def fpow(v, q):  # type: ignore[no-untyped-def]
    """v^q for v >= 0 as e^(q log v): 0^q = 0 for q > 0 and +inf for q < 0."""
    return fexp(q * flog(v))


def series_cut(like: Any) -> float:
    """|r| below which log cosh and tanh use their Taylor series: 0.125 in float64, 0.5 in
    float32 (where the closed forms lose bits to cancellation sooner)."""
    return 0.125


@overload(series_cut)
def _series_cut(like):  # type: ignore[no-untyped-def]
    if like == nt.float32:
        return lambda like: np.float32(0.5)
    return lambda like: np.float64(0.125)
