"""KL divergence per row: KL(p || q) = sum_k p_k (log p_k - log q_k), p = target.

A target p_k = 0 contributes exactly 0 (PyTorch ``where(p > 0)``, SciPy rel_entr). Row
functions follow the contract of ``classification.py``. The terms are computed in
float64 (``h`` is a float64 row): KL is a difference of nearly equal sums when q is close
to p, and float32 terms would lose the result's leading digits.
"""

from __future__ import annotations

import math

import numpy as np

from ._explog import clog, flog
from ._numerics import LOG_FLOOR, block_sum, clip, fconst, inline, poison, saturate, unit_poison

_FLOOR_ARG = math.exp(LOG_FLOOR)  # log q is floored at or below this q


@inline
def _xlogx(p):  # type: ignore[no-untyped-def]
    """p log p, 0 at p = 0 (NaN stays NaN)."""
    return p * flog(p) if p != fconst(p, 0.0) else fconst(p, 0.0)


@inline
def kl_probs_row(q, p, g, e, h, coef, unused, strict, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are probabilities q; log q is floored at -100. Gradient -p / q.

    A term is p log(p / q): one log and one division an element (the quotient is also
    the gradient), where log p - log q takes two logs; near q = p its rounding error no
    longer grows with |log p|. Where the floor is active (q <= e^-100) the term is
    p (log p + 100) and the gradient 0."""
    for k in range(q.size):
        pk = np.float64(p[k])
        qk = np.float64(q[k])
        floored = not (qk > _FLOOR_ARG)  # and NaN, which the poison catches
        ratio = pk / qk
        lr = flog(pk if floored else ratio) - (LOG_FLOOR if floored else 0.0)
        h[k] = (pk * lr if pk != 0.0 else 0.0) + unit_poison(pk) + unit_poison(qk)
        if want_grad:
            g[k] = (saturate(-coef * (0.0 if floored else ratio), q) if pk != 0.0
                    else fconst(q, 0.0))
    return block_sum(h)


@inline
def kl_log_row(lq, p, g, e, h, coef, unused, strict, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are log q (PyTorch KLDivLoss input). Gradient -p. log q = -inf is
    accepted where p = 0 (an exact zero); elsewhere it makes the loss +inf."""
    cf = fconst(lq, coef)
    for k in range(lq.size):
        pk = np.float64(p[k])
        lqk = np.float64(lq[k])
        # log q = -inf where p = 0 is an exact zero probability: valid, contributes 0.
        h[k] = (_xlogx(pk) - (pk * lqk if pk != 0.0 else 0.0)
                + unit_poison(pk) + (poison(lqk) if strict and lqk != -np.inf else 0.0))
        if want_grad:
            g[k] = -cf * p[k]
    return block_sum(h)


@inline
def kl_probs_row_hessian(q, p, g, hs, e, h, coef, unused, lo, hi,  # type: ignore[no-untyped-def]
                         strict):
    """p_k / q_k^2: 0 where p_k = 0 or the log floor is active."""
    loss = kl_probs_row(q, p, g, e, h, coef, unused, strict, True)
    for k in range(q.size):
        pk = np.float64(p[k])
        _, d = clog(np.float64(q[k]))
        hs[k] = saturate(coef * clip(pk * d * d, lo, hi), q)
    return loss


@inline
def kl_log_row_hessian(lq, p, g, hs, e, h, coef, unused, lo, hi,  # type: ignore[no-untyped-def]
                       strict):
    """0: KL is linear in log q."""
    loss = kl_log_row(lq, p, g, e, h, coef, unused, strict, True)
    for k in range(lq.size):
        hs[k] = coef * clip(0.0, lo, hi)
    return loss
