"""Vectorisable elementary functions over the whole range: the math of plugin element
functions (``lossgrad.plugin`` re-exports them).

PyPI's llvmlite has no SVML, so ``math.exp``, ``math.log`` or ``math.log1p`` inside a
numba loop is a scalar libm call that keeps the loop from vectorising (a plugin's Fair
loss with ``math.log1p`` runs tens of times slower than ``pseudo_huber``). These are
branch-free compositions of the kernels' own exp/log (``_explog``), which LLVM inlines
into the driver's loop. Each one:

- in compiled code, runs in the float type of its argument (float32 math stays float32);
- called from plain Python, is the ``math`` function (so an element function can be
  tried without compiling it);
- has the accuracy bound (in ulps of its argument's type) that tests/test_plugin_math.py
  checks against NumPy in float64; results below the smallest normal number are flushed
  to 0, and 0, Inf and NaN give the IEEE results.

The file lives with the kernels so that an edit changes numba's cache directory (see
``kernels/__init__.py``): a cached plugin driver never keeps an old version inlined.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types as nt
from numba.extending import overload

from ._explog import (
    _ROUND_32,
    _ROUND_64,
    _exp32_red,
    _exp64_red,
    fexp_nonpositive,
    flog,
    flog1p_unit,
)
from ._numerics import bits_f32, bits_f64, f32_bits, f64_bits, fconst

__all__ = ["exp", "log", "log1p", "sigmoid", "softplus"]

# Beyond these, e^x overflows to Inf or falls below the smallest normal number (flushed).
_EXP_MAX_64 = 709.782712893384
_EXP_MIN_64 = -708.3964185322641
_EXP_MAX_32 = 88.72283935546875
_EXP_MIN_32 = -87.33654


def _exp64(x):  # type: ignore[no-untyped-def]
    # Clamped so that k in [-1022, 1024]; 2^k is applied as two factors 2^(k//2) and
    # 2^(k - k//2), each a normal number: e^x stays finite up to the largest double and
    # overflows to Inf beyond it.
    xc = -708.5 if x < -708.5 else (709.8 if x > 709.8 else x)
    p, kf = _exp64_red(xc)
    k = f64_bits(kf + _ROUND_64) - f64_bits(np.float64(_ROUND_64))
    k1 = k >> 1
    res = p * bits_f64((k1 + 1023) << 52) * bits_f64((k - k1 + 1023) << 52)
    res = 0.0 if x < _EXP_MIN_64 else res
    res = math.inf if x > _EXP_MAX_64 else res
    return x if x != x else res


def _exp32(x):  # type: ignore[no-untyped-def]
    xc = np.float32(-87.34) if x < np.float32(-87.34) else (
        np.float32(88.73) if x > np.float32(88.73) else x)
    p, kf = _exp32_red(xc)
    k = np.int64(f32_bits(kf + np.float32(_ROUND_32))) - np.int64(
        f32_bits(np.float32(_ROUND_32)))
    k1 = k >> 1
    res = p * bits_f32((k1 + 127) << 23) * bits_f32((k - k1 + 127) << 23)
    res = np.float32(0.0) if x < np.float32(_EXP_MIN_32) else res
    res = np.float32(np.inf) if x > np.float32(_EXP_MAX_32) else res
    return x if x != x else res


def exp(x: float) -> float:
    """e^x. Within 2 ulp; Inf above log(largest finite), 0 below log(smallest normal)."""
    return math.exp(x)


@overload(exp)
def _exp(x):  # type: ignore[no-untyped-def]
    if x == nt.float32:
        return _exp32
    if x == nt.float64:
        return _exp64
    return None


def log(x: float) -> float:
    """Natural log. Within 2 ulp (2 eps absolute for x near 1, where log x is near 0);
    log(0) = -Inf, log(x < 0) = NaN."""
    return math.log(x)


@overload(log)
def _log(x):  # type: ignore[no-untyped-def]
    if isinstance(x, nt.Float):
        return lambda x: flog(x)
    return None


def _log1p_any(x):  # type: ignore[no-untyped-def]
    # 1 + x rounds; d = (1 + x) - 1 is exact, and log(w) + (x - d) / w corrects log(w)
    # for that rounding to first order, which is all it needs (|x - d| <= eps w / 2).
    one = fconst(x, 1.0)
    w = one + x
    d = w - one
    zero = fconst(x, 0.0)
    res = x if d == zero else flog(w) + (x - d) / (one if w == zero else w)
    res = x if x == fconst(x, math.inf) else res
    return fconst(x, -math.inf) if w == zero else res  # x = -1


def log1p(x: float) -> float:
    """log(1 + x), accurate for small |x|. Within 3 ulp (float32: 2); log1p(-1) = -Inf,
    NaN below -1."""
    return math.log1p(x)


@overload(log1p)
def _log1p(x):  # type: ignore[no-untyped-def]
    if isinstance(x, nt.Float):
        return _log1p_any
    return None


def softplus(x: float) -> float:
    """log(1 + e^x), without overflow or cancellation: max(x, 0) + log1p(e^-|x|).
    Within 4 ulp (float32: 2) down to results of the smallest normal number."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@overload(softplus)
def _softplus(x):  # type: ignore[no-untyped-def]
    if not isinstance(x, nt.Float):
        return None

    def impl(x):  # type: ignore[no-untyped-def]
        zero = fconst(x, 0.0)
        return (x if x > zero else zero) + flog1p_unit(fexp_nonpositive(-abs(x)))

    return impl


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), from e^-|x| so that neither side overflows. Within 4 ulp
    (float32: 3)."""
    e = math.exp(-abs(x))
    return (1.0 if x >= 0 else e) / (1.0 + e)


@overload(sigmoid)
def _sigmoid(x):  # type: ignore[no-untyped-def]
    if not isinstance(x, nt.Float):
        return None

    def impl(x):  # type: ignore[no-untyped-def]
        one = fconst(x, 1.0)
        e = fexp_nonpositive(-abs(x))
        return (one if x >= fconst(x, 0.0) else e) / (one + e)

    return impl
