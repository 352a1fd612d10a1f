"""Regression losses, per element: r = x - y (prediction minus target).

Each function takes (x, y, a, b) in the predictions' float type, where a and b are the
loss's scalar parameters, and returns (loss, d loss / d x); ``drivers.py`` applies
weights, the reduction and the gradient scale.
"""

from __future__ import annotations

import math

from ._numerics import fconst, inline, sign


@inline
def mae(x, y, a, b):  # type: ignore[no-untyped-def]
    """|r|; gradient sign(r), 0 at r = 0 (PyTorch L1Loss)."""
    r = x - y
    return abs(r), sign(r)


@inline
def mse(x, y, a, b):  # type: ignore[no-untyped-def]
    """r^2; gradient 2r (PyTorch MSELoss)."""
    r = x - y
    return r * r, fconst(x, 2.0) * r


@inline
def huber(x, y, delta, b):  # type: ignore[no-untyped-def]
    """0.5 r^2 for |r| < delta, else delta (|r| - delta/2) (PyTorch HuberLoss).

    The gradient is r inside and delta sign(r) outside; both agree at |r| = delta.
    """
    r = x - y
    a = abs(r)
    half = fconst(x, 0.5)
    inside = a < delta
    loss = half * r * r if inside else delta * (a - half * delta)
    return loss, (r if inside else delta * sign(r))


@inline
def pseudo_huber(x, y, delta, b):  # type: ignore[no-untyped-def]
    """delta^2 (sqrt(1 + (r/delta)^2) - 1) (SciPy pseudo_huber).

    Written r^2 / (sqrt(1 + u^2) + 1), u = r / delta, which has no cancellation for
    small r; the gradient is r / sqrt(1 + u^2).
    """
    r = x - y
    u = r / delta
    s = math.sqrt(fconst(x, 1.0) + u * u)
    return r * r / (s + fconst(x, 1.0)), r / s


# --- second derivatives d^2 loss / d x^2 (the Hessian path, ``second_order.py``) ---------

@inline
def mae_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """0: |r| is piecewise linear (and the kink at r = 0 has no second derivative)."""
    return fconst(x, 0.0)


@inline
def mse_hessian(x, y, a, b):  # type: ignore[no-untyped-def]
    """2, from r^2 (XGBoost's and LightGBM's squared error is r^2 / 2: h = 1)."""
    return fconst(x, 2.0)


@inline
def huber_hessian(x, y, delta, b):  # type: ignore[no-untyped-def]
    """1 for |r| <= delta (the quadratic side at the boundary), 0 outside."""
    return fconst(x, 1.0) if abs(x - y) <= delta else fconst(x, 0.0)


@inline
def pseudo_huber_hessian(x, y, delta, b):  # type: ignore[no-untyped-def]
    """(1 + u^2)^(-3/2), u = r / delta: in (0, 1], tending to 0 for large |r|."""
    u = (x - y) / delta
    s = math.sqrt(fconst(x, 1.0) + u * u)
    return fconst(x, 1.0) / (s * s * s)
