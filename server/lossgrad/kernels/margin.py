"""Margin losses of labels in {-1, 1} (or {0, 1}): hinge and squared hinge per element,
their second derivatives, and the check that a batch's labels are all of one kind.

Element functions follow the contract of ``classification.py``: (x, y, a, b) in the
predictions' float type, returning (loss, d loss / d x); ``a`` is 1 when the labels are
0/1 (mapped to -1/1), else 0.
"""

from __future__ import annotations

from numba import types as nt

from ._numerics import In, fconst, i8, inline, kernel


@inline
def _signed(x, y, zero_one):  # type: ignore[no-untyped-def]
    """The label in {-1, 1}: 2 y - 1 for 0/1 labels (``zero_one``), else y."""
    return fconst(x, 2.0) * y - fconst(x, 1.0) if zero_one != fconst(x, 0.0) else y


@inline
def hinge(x, y, zero_one, b):  # type: ignore[no-untyped-def]
    """max(0, 1 - y x), y in {-1, 1} (mapped from {0, 1} when zero_one); 0 at the margin."""
    s = _signed(x, y, zero_one)
    m = fconst(x, 1.0) - s * x
    active = m > fconst(x, 0.0)
    return (m if active else fconst(x, 0.0)), (-s if active else fconst(x, 0.0))


@inline
def squared_hinge(x, y, zero_one, b):  # type: ignore[no-untyped-def]
    """max(0, 1 - y x)^2; gradient -2 y max(0, 1 - y x)."""
    s = _signed(x, y, zero_one)
    m = max(fconst(x, 1.0) - s * x, fconst(x, 0.0))
    return m * m, fconst(x, -2.0) * s * m


@inline
def hinge_hessian(x, y, zero_one, b):  # type: ignore[no-untyped-def]
    """0: max(0, 1 - y x) is piecewise linear."""
    return fconst(x, 0.0)


@inline
def squared_hinge_hessian(x, y, zero_one, b):  # type: ignore[no-untyped-def]
    """2 y^2 = 2 where the margin is violated (1 - y x > 0), else 0 (0 at the margin)."""
    s = _signed(x, y, zero_one)
    return fconst(x, 2.0) if fconst(x, 1.0) - s * x > fconst(x, 0.0) else fconst(x, 0.0)


@kernel(lambda F: nt.Tuple((i8, i8))(In(F)))
def signed_label_mode(t):  # type: ignore[no-untyped-def]
    """(mode, bad index): mode 0 when all t in {-1, 1}, 1 when all in {0, 1}, -1 if neither.
    A branch-free count first (it vectorises: random labels mispredict a branch per
    element), then, only for labels that fail, a scan for the first offending index."""
    zeros = 0
    minus = 0
    others = 0
    for k in range(t.size):
        v = t[k]
        zeros += v == 0.0
        minus += v == -1.0
        others += (v != 0.0) & (v != -1.0) & (v != 1.0)
    if others == 0 and (zeros == 0 or minus == 0):
        return (1 if zeros else 0), -1
    return -1, _first_mixed_label(t)


@inline
def _first_mixed_label(t):  # type: ignore[no-untyped-def]
    """The index of the first label that is not in {-1, 0, 1}, or that mixes 0 and -1 with
    an earlier label."""
    seen_zero = False
    seen_minus = False
    for k in range(t.size):
        v = t[k]
        if v == 0.0:
            if seen_minus:
                return k
            seen_zero = True
        elif v == -1.0:
            if seen_zero:
                return k
            seen_minus = True
        elif v != 1.0:
            return k
    return -1
