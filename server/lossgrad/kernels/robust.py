"""More regression losses, per element: r = x - y (prediction minus target).

Same contract as ``regression.py``: each function takes (x, y, a, b) in the predictions'
float type, a and b being the loss's scalar parameters, and returns (loss, d loss / d x).
"""

from __future__ import annotations

import numpy as np

from ._explog import fexp_nonpositive, flog1p_unit
from ._numerics import fconst, inline, sign
from ._special import log1p_diff_of, series_cut

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): MAPE's divisor floor, MSLE's clamp
_LN2 = 0.6931471805599453


@inline
def smooth_l1(x, y, beta, b):  # type: ignore[no-untyped-def]
    """0.5 r^2 / beta for |r| < beta, else |r| - beta / 2 (PyTorch SmoothL1Loss).

    Gradient r / beta inside, sign(r) outside; both agree at |r| = beta. beta = 0 is L1:
    the inside branch is never taken (PyTorch dispatches to L1Loss there).
    """
    r = x - y
    a = abs(r)
    half = fconst(x, 0.5)
    inside = a < beta
    loss = half * r * r / beta if inside else a - half * beta
    return loss, (r / beta if inside else sign(r))


@inline
def _log_cosh_series(r):  # type: ignore[no-untyped-def]
    """Taylor series of log cosh r to r^14 (error below 1 ulp for |r| < series_cut)."""
    z = r * r
    return z * (fconst(r, 1 / 2) - z * (fconst(r, 1 / 12) - z * (fconst(r, 1 / 45) - z * (
        fconst(r, 17 / 2520) - z * (fconst(r, 31 / 14175) - z * (
            fconst(r, 691 / 935550) - z * fconst(r, 10922 / 42567525)))))))


@inline
def _tanh_series(r):  # type: ignore[no-untyped-def]
    """Taylor series of tanh r to r^15 (error below 1 ulp for |r| < series_cut)."""
    z = r * r
    return r * (fconst(r, 1.0) - z * (fconst(r, 1 / 3) - z * (fconst(r, 2 / 15) - z * (
        fconst(r, 17 / 315) - z * (fconst(r, 62 / 2835) - z * (fconst(r, 1382 / 155925) - z * (
            fconst(r, 21844 / 6081075) - z * fconst(r, 929569 / 638512875))))))))


@inline
def log_cosh(x, y, a, b):  # type: ignore[no-untyped-def]
    """log cosh r = |r| + log1p(e^(-2|r|)) - log 2 (Keras LogCosh); gradient tanh r.

    Near 0 that form (and Keras's) cancels to the rounding of log 2, so small |r| take the
    Taylor series of log cosh and tanh instead: full precision everywhere.
    """
    r = x - y
    m = abs(r)
    one = fconst(x, 1.0)
    e = fexp_nonpositive(fconst(x, -2.0) * m)
    small = m < series_cut(x)
    loss = _log_cosh_series(r) if small else m + flog1p_unit(e) - fconst(x, _LN2)
    tanh = _tanh_series(r) if small else sign(r) * (one - e) / (one + e)
    return loss, tanh


@inline
def quantile(x, y, tau, b):  # type: ignore[no-untyped-def]
    """Pinball loss tau max(y - x, 0) + (1 - tau) max(x - y, 0) (scikit-learn
    mean_pinball_loss, alpha = tau). Gradient 1 - tau above the target, -tau below, 0 at
    r = 0 (the kink)."""
    r = x - y
    zero = fconst(x, 0.0)
    above = r > zero
    loss = (fconst(x, 1.0) - tau) * r if above else -tau * r
    g = fconst(x, 1.0) - tau if above else (-tau if r < zero else zero)
    return loss, g


@inline
def mape(x, y, a, b):  # type: ignore[no-untyped-def]
    """100 |r| / max(|y|, 1e-7) (Keras MeanAbsolutePercentageError: a percentage, and
    Keras's epsilon); gradient 100 sign(r) / max(|y|, 1e-7)."""
    hundred = fconst(x, 100.0) / max(abs(y), fconst(x, KERAS_EPSILON))
    r = x - y
    return hundred * abs(r), hundred * sign(r)


@inline
def msle(x, y, a, b):  # type: ignore[no-untyped-def]
    """(log1p(max(x, eps)) - log1p(max(y, eps)))^2, eps = 1e-7 (Keras
    MeanSquaredLogarithmicError, which clamps both inputs first). Gradient
    2 d / (1 + x) where x > eps, 0 where the clamp is active.

    In float64 whatever the input type: the difference of two close logs would lose most
    of float32's digits.
    """
    xd = np.float64(x)
    eps = KERAS_EPSILON
    xc = max(xd, eps)
    d = log1p_diff_of(xc, max(np.float64(y), eps), x)
    g = 2.0 * d / (1.0 + xc)
    return d * d, (g if xd > eps else 0.0)


# --- second derivatives (the Hessian path: ``second_order.py``) -----------------------------

@inline
def smooth_l1_hessian(x, y, beta, b):  # type: ignore[no-untyped-def]
    """1 / beta for |r| <= beta (the quadratic side at the boundary), 0 outside and for
    beta = 0 (L1)."""
    inside = (beta > fconst(x, 0.0)) & (abs(x - y) <= beta)
    return fconst(x, 1.0) / beta if inside else fconst(x, 0.0)


@inline
def log_cosh_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """sech^2 r = 4 e / (1 + e)^2, e = e^(-2|r|): in (0, 1], no cancellation anywhere."""
    e = fexp_nonpositive(fconst(x, -2.0) * abs(x - y))
    d = fconst(x, 1.0) + e
    return fconst(x, 4.0) * e / (d * d)


@inline
def zero_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """0: quantile and mape are piecewise linear in the prediction."""
    return fconst(x, 0.0)


@inline
def msle_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """2 (1 - d) / (1 + x)^2, d = log1p(x) - log1p(max(y, eps)), where x > eps (negative
    where 1 + x > e (1 + y): MSLE is not convex); 0 where the clamp is active."""
    xd = np.float64(x)
    eps = KERAS_EPSILON
    xc = max(xd, eps)
    d = log1p_diff_of(xc, max(np.float64(y), eps), x)
    u = 1.0 + xc
    return 2.0 * (1.0 - d) / (u * u) if xd > eps else 0.0
