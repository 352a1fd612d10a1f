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
