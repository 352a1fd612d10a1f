"""Focal losses: cross-entropy scaled by (1 - p_t)^gamma, which down-weights the examples
the model already gets right. Binary on logits (per element) and softmax (per row).

Contracts as in ``classification.py``.
"""

from __future__ import annotations

import numpy as np

from ._numerics import (
    block_sum,
    fconst,
    fexp_nonpositive,
    flog,
    flog1p_unit,
    inline,
    unit_poison,
)
from .classification import softmax_row, unnormalised


@inline
def _modulating(omp, gamma):  # type: ignore[no-untyped-def]
    """(1 - p_t)^gamma for 1 - p_t in [0, 1] and gamma >= 0; exactly 1 for gamma = 0."""
    return (fconst(omp, 1.0) if gamma == fconst(omp, 0.0)
            else fexp_nonpositive(gamma * flog(omp)))


@inline
def sigmoid_focal(x, y, alpha, gamma):  # type: ignore[no-untyped-def]
    """alpha_t (1 - p_t)^gamma BCE_logits(x, y) (torchvision sigmoid_focal_loss), with
    p = sigmoid(x), 1 - p_t = p (1 - y) + (1 - p) y and alpha_t = alpha y + (1 - alpha)(1 - y),
    or 1 when alpha < 0. Soft labels y in [0, 1] are taken as they come.

    Gradient alpha_t [gamma (1 - p_t)^(gamma - 1) p (1 - p) (1 - 2y) BCE + (1 - p_t)^gamma
    (p - y)]; where 1 - p_t = 0 (a hard label predicted exactly) its first term is 0.
    """
    one = fconst(x, 1.0)
    zero = fconst(x, 0.0)
    e = fexp_nonpositive(-abs(x))
    r = one / (one + e)
    lg = flog1p_unit(e)
    p = (one if x >= zero else e) * r  # sigmoid(x)
    q = (e if x >= zero else one) * r  # sigmoid(-x) = 1 - p, without cancellation
    ce = y * (max(-x, zero) + lg) + (one - y) * (max(x, zero) + lg)
    omp = p * (one - y) + q * y
    mod = _modulating(omp, gamma)
    at = alpha * y + (one - alpha) * (one - y) if alpha >= zero else one
    slope = mod * p * q / omp if omp > zero else zero  # (1 - p_t)^(gamma - 1) p (1 - p)
    g = at * (gamma * slope * (one - fconst(x, 2.0) * y) * ce + mod * (p - y))
    return at * mod * ce + unit_poison(y), g


@inline
def _focal_terms(x, k, m, s1, e, gamma):  # type: ignore[no-untyped-def]
    """(p_k, 1 - p_k, log p_k, (1 - p_k)^gamma) of softmax(x) in float64. 1 - p_k at a
    maximum is s1 / S (the sum of the other exps), so it keeps its precision near 1."""
    total = 1.0 + s1
    pk = np.float64(unnormalised(e, x, m, k)) / total
    omp = s1 / total if x[k] == m else 1.0 - pk
    logp = np.float64(x[k] - m) - np.log1p(s1)
    return pk, omp, logp, _modulating(omp, gamma)


@inline
def softmax_focal_row(x, q, g, e, h, coef, gamma, strict, want_grad):  # type: ignore[no-untyped-def]
    """-sum_k q_k (1 - p_k)^gamma log p_k, p = softmax(x) (Keras CategoricalFocalCrossentropy
    with from_logits, alpha applied by the caller, without its 1e-7 probability clip).

    Gradient v_j - p_j sum_k v_k with v_k = -q_k (1 - p_k)^gamma (1 - gamma p_k log p_k /
    (1 - p_k)) (the second term 0 where p_k = 1).
    """
    c = x.size
    m, s1 = softmax_row(x, e, strict)
    for k in range(c):
        pk, omp, logp, mod = _focal_terms(x, k, m, s1, e, gamma)
        qk = np.float64(q[k])
        h[k] = -qk * mod * logp + unit_poison(qk)
    loss = block_sum(h)
    if want_grad:
        for k in range(c):
            pk, omp, logp, mod = _focal_terms(x, k, m, s1, e, gamma)
            ratio = logp / omp if omp > 0.0 else -1.0  # log p / (1 - p) -> -1 as p -> 1
            h[k] = -np.float64(q[k]) * mod * (1.0 - gamma * pk * ratio)
        sv = block_sum(h)
        for k in range(c):
            pk = np.float64(unnormalised(e, x, m, k)) / (1.0 + s1)
            g[k] = fconst(x, coef * (h[k] - pk * sv))
    return loss
