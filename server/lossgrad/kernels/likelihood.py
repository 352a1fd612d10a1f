"""Likelihood losses of count and positive data, per element: Poisson, Tweedie, Gaussian.

Same contract as ``regression.py`` (x prediction, y target, a and b the loss's scalar
parameters; returns (loss, d loss / d x)). A value outside a loss's domain (a negative
rate, a non-positive Tweedie mean) makes the loss NaN, and the engine then names it.
The math runs in float64 for either input type: these losses are differences of terms
that cancel near their minimum (e^x - y x, deviances, log v + r^2 / v), where float32
would keep few correct digits.
"""

from __future__ import annotations

import math

import numpy as np

from ._explog import flog
from ._numerics import inline
from ._special import fexp, fpow

POISSON_EPS = 1e-8  # PyTorch PoissonNLLLoss eps: log(x + eps) for rate input
GAUSSIAN_EPS = 1e-6  # PyTorch GaussianNLLLoss eps: the variance is clamped to >= eps
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@inline
def _nan_if(bad):  # type: ignore[no-untyped-def]
    return math.nan if bad else 0.0


@inline
def _stirling(y, full):  # type: ignore[no-untyped-def]
    """y log y - y + log(2 pi y) / 2 where y > 1 and ``full`` is set, else 0 (PyTorch's
    Stirling term: constant in the prediction, so no gradient)."""
    ly = flog(y)
    term = y * ly - y + 0.5 * ly + _HALF_LOG_2PI
    return term if (full != 0.0) & (y > 1.0) else 0.0


@inline
def poisson_log(x, y, full, b):  # type: ignore[no-untyped-def]
    """e^x - y x for log-rate input x (PyTorch PoissonNLLLoss, log_input=True); gradient
    e^x - y. e^x overflows to +inf above log(largest float)."""
    loss, g = poisson_log_plain(x, y, full, b)
    return loss + _stirling(np.float64(y), full), g


@inline
def poisson_log_plain(x, y, full, b):  # type: ignore[no-untyped-def]
    """``poisson_log`` without the Stirling term, for ``full`` off: no log per element
    (the driver picks it; a select would still compute the log)."""
    xd, yd = np.float64(x), np.float64(y)
    ex = fexp(xd)
    return ex - yd * xd, ex - yd


@inline
def poisson_rate(x, y, full, b):  # type: ignore[no-untyped-def]
    """x - y log(x + 1e-8) for rate input x >= 0 (PyTorch PoissonNLLLoss,
    log_input=False); gradient 1 - y / (x + 1e-8)."""
    loss, g = poisson_rate_plain(x, y, full, b)
    return loss + _stirling(np.float64(y), full), g


@inline
def poisson_rate_plain(x, y, full, b):  # type: ignore[no-untyped-def]
    """``poisson_rate`` without the Stirling term, for ``full`` off: one log per element."""
    xd, yd = np.float64(x), np.float64(y)
    u = xd + POISSON_EPS
    return xd - yd * flog(u) + _nan_if(xd < 0.0), 1.0 - yd / u


@inline
def tweedie(x, y, power, b):  # type: ignore[no-untyped-def]
    """Tweedie unit deviance of mean x > 0 for power p < 0, 1 < p < 2 or p > 2
    (scikit-learn mean_tweedie_deviance):
    2 (max(y, 0)^(2-p) / ((1-p)(2-p)) - y x^(1-p) / (1-p) + x^(2-p) / (2-p)).
    Targets: y >= 0 for 1 < p < 2, y > 0 for p > 2, any for p < 0. Gradient
    2 x^-p (x - y).

    x^(1-p) and x^-p are exps of one log of x, and the constant divisors are products
    with their reciprocals: in a vector loop a float64 division costs more than an exp.
    """
    xd, yd, p = np.float64(x), np.float64(y), np.float64(power)
    q1 = 1.0 - p
    q2 = 2.0 - p
    lx = flog(xd)
    x1 = fexp(q1 * lx)  # x^(1-p)
    loss = 2.0 * (fpow(max(yd, 0.0), q2) * (1.0 / (q1 * q2)) - yd * x1 * (1.0 / q1)
                  + x1 * xd * (1.0 / q2))
    bad_y = (p > 1.0) & ((yd < 0.0) | ((p > 2.0) & (yd == 0.0)))
    return loss + _nan_if(bad_y | (not xd > 0.0)), 2.0 * fexp(-p * lx) * (xd - yd)


@inline
def tweedie_three_halves(x, y, power, b):  # type: ignore[no-untyped-def]
    """``tweedie`` at p = 1.5 (the default here, in XGBoost and in LightGBM), where its
    deviance is 4 (sqrt(x) - sqrt(y))^2 / sqrt(x) for y >= 0: square roots and divisions
    instead of two logs and three exps. sqrt(x) - sqrt(y) is formed as
    (x - y) / (sqrt(x) + sqrt(y)), so the loss keeps float64's precision near its minimum
    (the expanded form cancels there). Gradient 2 (x - y) x^-1.5."""
    xd, yd = np.float64(x), np.float64(y)
    sx = math.sqrt(xd)
    rx = 1.0 / sx
    t = (xd - yd) / (sx + math.sqrt(max(yd, 0.0)))
    loss = 4.0 * t * t * rx
    return loss + _nan_if((yd < 0.0) | (not xd > 0.0)), 2.0 * (xd - yd) * (rx * rx * rx)


@inline
def poisson_deviance(x, y, a, b):  # type: ignore[no-untyped-def]
    """Tweedie power 1: 2 (y log(y / x) - y + x), 0 log 0 = 0, for x > 0, y >= 0
    (scikit-learn mean_poisson_deviance); gradient 2 (1 - y / x)."""
    xd, yd = np.float64(x), np.float64(y)
    ylog = yd * (flog(yd) - flog(xd)) if yd != 0.0 else 0.0
    loss = 2.0 * (ylog - yd + xd) + _nan_if((yd < 0.0) | (not xd > 0.0))
    return loss, 2.0 * (1.0 - yd / xd)


@inline
def gamma_deviance(x, y, a, b):  # type: ignore[no-untyped-def]
    """Tweedie power 2: 2 (log(x / y) + y / x - 1) for x > 0, y > 0 (scikit-learn
    mean_gamma_deviance); gradient 2 (x - y) / x^2."""
    xd, yd = np.float64(x), np.float64(y)
    loss = 2.0 * (flog(xd) - flog(yd) + yd / xd - 1.0)
    return loss + _nan_if((not yd > 0.0) | (not xd > 0.0)), 2.0 * (xd - yd) / (xd * xd)


@inline
def gaussian_nll(x, y, var, full):  # type: ignore[no-untyped-def]
    """0.5 (log v + (x - y)^2 / v) [+ 0.5 log 2 pi when ``full``], v = max(var, 1e-6)
    (PyTorch GaussianNLLLoss). Returns (loss, d/dx, d/dvar): (x - y) / v and
    0.5 (1 / v - (x - y)^2 / v^2), both at the clamped v, as PyTorch's autograd gives
    (it clamps without recording the clamp). A negative variance makes the loss NaN."""
    vd = np.float64(var)
    v = max(vd, GAUSSIAN_EPS)
    r = np.float64(x) - np.float64(y)
    rv = r / v
    const = _HALF_LOG_2PI if full else 0.0
    loss = 0.5 * (flog(v) + r * rv) + const + _nan_if(vd < 0.0)
    return loss, rv, 0.5 * (1.0 - r * rv) / v


# --- second derivatives (the Hessian path: ``second_order.py``) -----------------------------

@inline
def poisson_log_hessian(x, y, full, b):  # type: ignore[no-untyped-def]
    """e^x (XGBoost's count:poisson adds max_delta_step to x; that is not done here)."""
    return fexp(np.float64(x))


@inline
def poisson_rate_hessian(x, y, full, b):  # type: ignore[no-untyped-def]
    """y / (x + 1e-8)^2."""
    u = np.float64(x) + POISSON_EPS
    return np.float64(y) / (u * u)


@inline
def tweedie_hessian(x, y, power, b):  # type: ignore[no-untyped-def]
    """2 x^-p ((1 - p) + p y / x): positive for 1 < p < 2 and y >= 0, negative where
    (1 - p) x + p y < 0 otherwise."""
    xd, yd, p = np.float64(x), np.float64(y), np.float64(power)
    return 2.0 * fpow(xd, -p) * ((1.0 - p) + p * yd / xd)


@inline
def poisson_deviance_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """2 y / x^2."""
    xd = np.float64(x)
    return 2.0 * np.float64(y) / (xd * xd)


@inline
def gamma_deviance_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """2 (2 y - x) / x^3 (negative where x > 2 y)."""
    xd = np.float64(x)
    return 2.0 * (2.0 * np.float64(y) - xd) / (xd * xd * xd)
