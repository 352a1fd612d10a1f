"""KL divergence per row: KL(p || q) = sum_k p_k (log p_k - log q_k), p = target.

A target p_k = 0 contributes exactly 0 (PyTorch ``where(p > 0)``, SciPy rel_entr). Row
functions follow the contract of ``classification.py``. The terms are computed in
float64 (``h`` is a float64 row): KL is a difference of nearly equal sums when q is close
to p, and float32 terms would lose the result's leading digits.
"""

from __future__ import annotations

import numpy as np

from ._numerics import (
    T_OUTSIDE_UNIT,
    X_OUTSIDE_UNIT,
    block_sum,
    check_values,
    clog,
    fconst,
    flog,
    inline,
    saturate,
)


@inline
def _xlogx(p):  # type: ignore[no-untyped-def]
    """p log p, 0 at p = 0 (NaN stays NaN)."""
    return p * flog(p) if p != fconst(p, 0.0) else fconst(p, 0.0)


@inline
def kl_probs_row(q, p, g, e, h, coef, unused, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are probabilities q; log q is floored at -100. Gradient -p / q."""
    flags = check_values(q, X_OUTSIDE_UNIT) | check_values(p, T_OUTSIDE_UNIT)
    for k in range(q.size):
        pk = np.float64(p[k])
        lq, dlq = clog(np.float64(q[k]))
        h[k] = _xlogx(pk) - (pk * lq if pk != 0.0 else 0.0)
        if want_grad:
            g[k] = saturate(-coef * pk * dlq, q) if pk != 0.0 else fconst(q, 0.0)
    return block_sum(h), flags


@inline
def kl_log_row(lq, p, g, e, h, coef, unused, want_grad):  # type: ignore[no-untyped-def]
    """Predictions are log q (PyTorch KLDivLoss input). Gradient -p."""
    flags = check_values(lq, 0) | check_values(p, T_OUTSIDE_UNIT)
    cf = fconst(lq, coef)
    for k in range(lq.size):
        pk = np.float64(p[k])
        h[k] = _xlogx(pk) - (pk * np.float64(lq[k]) if pk != 0.0 else 0.0)
        if want_grad:
            g[k] = -cf * p[k]
    return block_sum(h), flags
