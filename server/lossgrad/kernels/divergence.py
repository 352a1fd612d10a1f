"""KL divergence per row: KL(p || q) = sum_k p_k (log p_k - log q_k), p = target.

A target p_k = 0 contributes exactly 0 (PyTorch ``where(p > 0)``, SciPy rel_entr).
"""

from __future__ import annotations

import math

from ._numerics import clog, clog_grad, inline


@inline
def kl_probs_row(q, p, g, coef, unused, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are probabilities q; log q is floored at -100. Gradient -p / q."""
    loss = 0.0
    for k in range(q.size):
        pk = p[k]
        if pk > 0.0:
            loss += pk * (math.log(pk) - clog(q[k]))
        if want_grad:
            g[k] = -coef * pk * clog_grad(q[k]) if pk > 0.0 else 0.0
    return loss


@inline
def kl_log_row(lq, p, g, coef, unused, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are log q (PyTorch KLDivLoss input). Gradient -p."""
    loss = 0.0
    for k in range(lq.size):
        pk = p[k]
        if pk > 0.0:
            loss += pk * (math.log(pk) - lq[k])
        if want_grad:
            g[k] = -coef * pk
    return loss
