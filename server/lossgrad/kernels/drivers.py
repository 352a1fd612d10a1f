"""Generic kernels that run a per-element or per-row loss over a whole batch.

A driver applies per-position weights ``w`` (empty: all 1), writes the weighted
per-position losses to ``out`` (empty: not wanted) and ``scale * w * d loss / d x`` to
``grad``, and returns sum(w * loss) accumulated in float64 over fixed blocks.
"""

from __future__ import annotations

from ._numerics import BLOCK, In, Out, b1, f8, i8, inline, kernel
from .classification import bce, bce_logits, cce_logits_row, cce_probs_row, hinge, squared_hinge
from .divergence import kl_log_row, kl_probs_row
from .regression import huber, mae, mse, pseudo_huber

# Element ops: (a, b) are the loss's scalar parameters.
MAE, MSE, HUBER, PSEUDO_HUBER, HINGE, SQUARED_HINGE, BCE, BCE_LOGITS = range(8)
# Row ops: ``a`` is label smoothing where the loss has it.
CCE_LOGITS, CCE_PROBS, KL_PROBS, KL_LOG = range(4)


@inline
def _element(op, x, y, a, b):  # type: ignore[no-untyped-def]
    if op == MAE:
        return mae(x, y)
    if op == MSE:
        return mse(x, y)
    if op == HUBER:
        return huber(x, y, a)
    if op == PSEUDO_HUBER:
        return pseudo_huber(x, y, a)
    if op == HINGE:
        return hinge(x, y, a != 0.0)
    if op == SQUARED_HINGE:
        return squared_hinge(x, y, a != 0.0)
    if op == BCE:
        return bce(x, y, a, b)
    return bce_logits(x, y, a, b)


@kernel(lambda F: f8(In(F), In(F), In(f8), Out(F), Out(F), f8, i8, f8, f8))
def elementwise(x, y, w, out, grad, scale, op, a, b):  # type: ignore[no-untyped-def]
    n = x.size
    has_w = w.size > 0
    want_out = out.size > 0
    want_grad = grad.size > 0
    total = 0.0
    for lo in range(0, n, BLOCK):
        acc = 0.0
        for k in range(lo, min(lo + BLOCK, n)):
            loss, g = _element(op, f8(x[k]), f8(y[k]), a, b)
            wk = w[k] if has_w else 1.0
            acc += wk * loss
            if want_out:
                out[k] = wk * loss
            if want_grad:
                grad[k] = scale * wk * g
        total += acc
    return total


@inline
def _row(op, x, t, g, coef, a, want_grad):  # type: ignore[no-untyped-def]
    if op == CCE_LOGITS:
        return cce_logits_row(x, t, g, coef, a, want_grad)
    if op == CCE_PROBS:
        return cce_probs_row(x, t, g, coef, a, want_grad)
    if op == KL_PROBS:
        return kl_probs_row(x, t, g, coef, a, want_grad)
    return kl_log_row(x, t, g, coef, a, want_grad)


@kernel(lambda F: f8(In(F, 2), In(F, 2), In(f8), Out(F), Out(F, 2), f8, i8, f8, b1))
def dense_rows(x, t, w, out, grad, scale, op, a, want_grad):  # type: ignore[no-untyped-def]
    """Rows of predictions against rows of targets; ``grad`` is (1, C) when not wanted."""
    rows, c = x.shape
    has_w = w.size > 0
    want_out = out.size > 0
    per_block = max(1, BLOCK // c)
    total = 0.0
    for lo in range(0, rows, per_block):
        acc = 0.0
        for i in range(lo, min(lo + per_block, rows)):
            wi = w[i] if has_w else 1.0
            gi = grad[i] if want_grad else grad[0]
            loss = _row(op, x[i], t[i], gi, scale * wi, a, want_grad)
            acc += wi * loss
            if want_out:
                out[i] = wi * loss
        total += acc
    return total
