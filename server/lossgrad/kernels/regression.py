"""Regression losses, per element: r = x - y (prediction minus target).

Each function returns (loss, d loss / d x) in float64 for one element; the drivers in
``drivers.py`` apply weights, reductions and the gradient scale.
"""

from __future__ import annotations

import math

from ._numerics import inline, sign


@inline
def mae(x, y):  # type: ignore[no-untyped-def]
    """|r|; gradient sign(r), 0 at r = 0 (PyTorch L1Loss)."""
    r = x - y
    return abs(r), sign(r)


@inline
def mse(x, y):  # type: ignore[no-untyped-def]
    """r^2; gradient 2r (PyTorch MSELoss)."""
    r = x - y
    return r * r, 2.0 * r


@inline
def huber(x, y, delta):  # type: ignore[no-untyped-def]
    """0.5 r^2 for |r| < delta, else delta (|r| - delta/2) (PyTorch HuberLoss).

    The gradient is r inside and delta sign(r) outside; both sides agree at |r| = delta.
    """
    r = x - y
    a = abs(r)
    if a < delta:
        return 0.5 * r * r, r
    return delta * (a - 0.5 * delta), delta * sign(r)


@inline
def pseudo_huber(x, y, delta):  # type: ignore[no-untyped-def]
    """delta^2 (sqrt(1 + (r/delta)^2) - 1) (SciPy pseudo_huber).

    Written delta^2 expm1(log1p(u^2) / 2), u = r / delta, to keep small r exact; the
    gradient is r / sqrt(1 + u^2).
    """
    r = x - y
    u = r / delta
    return delta * delta * math.expm1(0.5 * math.log1p(u * u)), r / math.sqrt(1.0 + u * u)
