"""Focal losses: cross-entropy scaled by (1 - p_t)^gamma, which down-weights the examples
the model already gets right. Binary on logits (per element) and softmax (per row).

Contracts as in ``classification.py``.
"""

from __future__ import annotations

import numpy as np

from ._explog import fexp_nonpositive, flog, flog1p_unit
from ._numerics import block_sum, clip, fconst, inline, loop, unit_poison
from .classification import softmax_row, unnormalised


@inline
def _modulating(omp, gamma):  # type: ignore[no-untyped-def]
    """(1 - p_t)^gamma for 1 - p_t in [0, 1] and gamma >= 0; exactly 1 for gamma = 0 and
    the product (1 - p_t)^2 for gamma = 2 (the usual choice), as ``_squared`` gives."""
    power = fexp_nonpositive(gamma * flog(omp))
    return (fconst(omp, 1.0) if gamma == fconst(omp, 0.0)
            else (_squared(omp, gamma) if gamma == fconst(omp, 2.0) else power))


@inline
def _squared(omp, gamma):  # type: ignore[no-untyped-def]
    """(1 - p_t)^gamma for gamma = 2, without a log and an exp per element."""
    return omp * omp


@inline
def _sigmoid_terms(x, y, gamma, modulating=_modulating):  # type: ignore[no-untyped-def]
    """(p, 1 - p, BCE_logits, 1 - p_t, (1 - p_t)^gamma, (1 - p_t)^(gamma - 1) p (1 - p))
    in the type of x; the last is 0 where 1 - p_t = 0."""
    one = fconst(x, 1.0)
    zero = fconst(x, 0.0)
    e = fexp_nonpositive(-abs(x))
    r = one / (one + e)
    lg = flog1p_unit(e)
    p = (one if x >= zero else e) * r  # sigmoid(x)
    q = (e if x >= zero else one) * r  # sigmoid(-x) = 1 - p, without cancellation
    ce = y * (max(-x, zero) + lg) + (one - y) * (max(x, zero) + lg)
    omp = p * (one - y) + q * y
    mod = modulating(omp, gamma)
    slope = mod * p * q / omp if omp > zero else zero
    return p, q, ce, omp, mod, slope


@inline
def _alpha_t(y, alpha):  # type: ignore[no-untyped-def]
    one = fconst(y, 1.0)
    return alpha * y + (one - alpha) * (one - y) if alpha >= fconst(y, 0.0) else one


@inline
def sigmoid_focal(x, y, alpha, gamma):  # type: ignore[no-untyped-def]
    """alpha_t (1 - p_t)^gamma BCE_logits(x, y) (torchvision sigmoid_focal_loss), with
    p = sigmoid(x), 1 - p_t = p (1 - y) + (1 - p) y and alpha_t = alpha y + (1 - alpha)(1 - y),
    or 1 when alpha < 0. Soft labels y in [0, 1] are taken as they come.

    Gradient alpha_t [gamma (1 - p_t)^(gamma - 1) p (1 - p) (1 - 2y) BCE + (1 - p_t)^gamma
    (p - y)]; where 1 - p_t = 0 (a hard label predicted exactly) its first term is 0.
    """
    return _sigmoid_focal(_modulating, x, y, alpha, gamma)


@inline
def sigmoid_focal_squared(x, y, alpha, gamma):  # type: ignore[no-untyped-def]
    """``sigmoid_focal`` for gamma = 2 (the usual choice): (1 - p_t)^2 as a product, with
    no log and exp per element (the driver picks it; the values are the same)."""
    return _sigmoid_focal(_squared, x, y, alpha, gamma)


@loop
def _sigmoid_focal(modulating, x, y, alpha, gamma):  # type: ignore[no-untyped-def]
    p, q, ce, omp, mod, slope = _sigmoid_terms(x, y, gamma, modulating)
    g = _alpha_t(y, alpha) * (gamma * slope * (fconst(x, 1.0) - fconst(x, 2.0) * y) * ce
                              + mod * (p - y))
    return _alpha_t(y, alpha) * mod * ce + unit_poison(y), g


@inline
def sigmoid_focal_hessian(x, y, alpha, gamma):  # type: ignore[no-untyped-def]
    """d^2/dx^2 of ``sigmoid_focal``, in float64: with u = 1 - p_t, s = p (1 - p),
    A = u^(gamma-1) s and B = u^(gamma-2) s^2 = A s / u (s / u <= 1, so neither blows up
    for gamma < 2: both are u^gamma times a bounded factor),
    alpha_t [BCE (gamma (gamma-1) (1-2y)^2 B + gamma (1-2y)(1-2p) A)
    + 2 gamma (1-2y)(p-y) A + u^gamma s]. Where u = 0 (a hard label predicted exactly:
    the limit) A = B = 0. gamma = 0 gives alpha_t s, the (weighted) BCE Hessian. Negative
    for some inputs when gamma > 0 (the loss is not convex)."""
    xd = np.float64(x)
    yd = np.float64(y)
    g = np.float64(gamma)
    p, q, ce, omp, mod, slope = _sigmoid_terms(xd, yd, g)
    s = p * q
    curv = slope * s / omp if omp > 0.0 else 0.0  # B
    sgn = 1.0 - 2.0 * yd
    p_y = p * (1.0 - yd) - q * yd  # p - y, without cancellation as p -> y = 1
    h = (ce * (g * (g - 1.0) * sgn * sgn * curv + g * sgn * (q - p) * slope)
         + 2.0 * g * sgn * p_y * slope + mod * s)
    return _alpha_t(yd, np.float64(alpha)) * h


@inline
def _focal_terms(x, k, m, s1, lse, e, gamma, modulating=_modulating):  # type: ignore[no-untyped-def]
    """(p_k, 1 - p_k, log p_k, (1 - p_k)^gamma) of softmax(x) in float64, given the row's
    ``lse`` = log1p(s1) (computed once a row: a libm call in the loop keeps it scalar).
    1 - p_k at a maximum is s1 / S (the sum of the other exps), so it keeps its precision
    near 1. ``modulating`` gives (1 - p_k)^gamma."""
    total = 1.0 + s1
    pk = np.float64(unnormalised(e, x, m, k)) / total
    omp = s1 / total if x[k] == m else 1.0 - pk
    logp = np.float64(x[k] - m) - lse
    return pk, omp, logp, modulating(omp, gamma)


@inline
def softmax_focal_row(x, q, g, e, h, coef, gamma, strict, want_grad):  # type: ignore[no-untyped-def]
    """-sum_k q_k (1 - p_k)^gamma log p_k, p = softmax(x) (Keras CategoricalFocalCrossentropy
    with from_logits, alpha applied by the caller, without its 1e-7 probability clip).

    Gradient v_j - p_j sum_k v_k with v_k = -q_k (1 - p_k)^gamma (1 - gamma p_k log p_k /
    (1 - p_k)) (the second term 0 where p_k = 1). gamma = 2 has loops of its own, with
    no log and exp per class (the same values as the general loops give it).
    """
    if gamma == 2.0:
        return _focal_row(_squared, x, q, g, e, h, coef, gamma, strict, want_grad)
    return _focal_row(_modulating, x, q, g, e, h, coef, gamma, strict, want_grad)


@loop
def _focal_row(modulating, x, q, g, e, h, coef, gamma, strict, want_grad):  # type: ignore[no-untyped-def]
    c = x.size
    m, s1 = softmax_row(x, e, e, False, strict)
    lse = np.log1p(s1)
    for k in range(c):
        pk, omp, logp, mod = _focal_terms(x, k, m, s1, lse, e, gamma, modulating)
        qk = np.float64(q[k])
        h[k] = -qk * mod * logp + unit_poison(qk)
    loss = block_sum(h)
    if want_grad:
        for k in range(c):
            pk, omp, logp, mod = _focal_terms(x, k, m, s1, lse, e, gamma, modulating)
            ratio = logp / omp if omp > 0.0 else -1.0  # log p / (1 - p) -> -1 as p -> 1
            h[k] = -np.float64(q[k]) * mod * (1.0 - gamma * pk * ratio)
        sv = block_sum(h)
        for k in range(c):
            pk = np.float64(unnormalised(e, x, m, k)) / (1.0 + s1)
            g[k] = fconst(x, coef * (h[k] - pk * sv))
    return loss


@inline
def softmax_focal_row_hessian(x, q, g, hs, e, h, coef, gamma, lo, hi,  # type: ignore[no-untyped-def]
                              strict):
    """Diagonal of the Hessian of ``softmax_focal_row`` w.r.t. the logits. With
    f_k(p) = -q_k (1 - p)^gamma log p, v_k = p_k f_k' (the gradient's terms) and
    u_k = p_k^2 f_k'': H_jj = (1 - 2 p_j)(v_j - p_j sum_k v_k) + u_j (1 - p_j)^2
    + p_j^2 sum_{k != j} u_k. u_k grows like (1 - p_k)^(gamma - 1) as p_k -> 1, so it is
    only used where bounded: t_k = u_k (1 - p_k)^2 is computed directly, and the term of
    the row's (first) maximum k* in another position's sum as (p_j / (1 - p_k*))^2 t_k*
    (p_j <= 1 - p_k*). Every other p_k <= 1/2. Equals p_j (1 - p_j) sum q for gamma = 0."""
    loss = softmax_focal_row(x, q, g, e, h, coef, gamma, strict, True)
    c = x.size
    m, s1 = softmax_row(x, e, e, False, strict)
    lse = np.log1p(s1)
    top = 0
    while x[top] != m and top < c - 1:
        top += 1
    sv = 0.0
    rest = 0.0  # sum of u_k over k != top
    for k in range(c):
        pk, omp, logp, mod = _focal_terms(x, k, m, s1, lse, e, gamma)
        qk = np.float64(q[k])
        ratio = logp / omp if omp > 0.0 else -1.0
        sv += -qk * mod * (1.0 - gamma * pk * ratio)
        if k != top:
            rest += _focal_u(qk, pk, omp, logp, mod, gamma)
    p_top, o_top, lp_top, mod_top = _focal_terms(x, top, m, s1, lse, e, gamma)
    t_top = _focal_t(np.float64(q[top]), p_top, o_top, lp_top, mod_top, gamma)
    for j in range(c):
        pj, omp, logp, mod = _focal_terms(x, j, m, s1, lse, e, gamma)
        qj = np.float64(q[j])
        ratio = logp / omp if omp > 0.0 else -1.0
        vj = -qj * mod * (1.0 - gamma * pj * ratio)
        if j == top:
            hu = t_top + pj * pj * rest
        else:
            lead = pj / o_top if o_top > 0.0 else 0.0
            hu = (_focal_t(qj, pj, omp, logp, mod, gamma)
                  + pj * pj * (rest - _focal_u(qj, pj, omp, logp, mod, gamma))
                  + lead * lead * t_top)
        hj = (1.0 - 2.0 * pj) * (vj - pj * sv) + hu
        hs[j] = fconst(x, coef * clip(hj, lo, hi))
    return loss


@inline
def _focal_u(qk, pk, omp, logp, mod, gamma):  # type: ignore[no-untyped-def]
    """p^2 f''(p) for f(p) = -q (1 - p)^gamma log p, where 1 - p >= 1/2:
    -q (1 - p)^gamma (gamma (gamma - 1) p^2 log p / (1 - p)^2 - 2 gamma p / (1 - p) - 1)."""
    return -qk * mod * (gamma * (gamma - 1.0) * pk * pk * logp / (omp * omp)
                        - 2.0 * gamma * pk / omp - 1.0)


@inline
def _focal_t(qk, pk, omp, logp, mod, gamma):  # type: ignore[no-untyped-def]
    """(1 - p)^2 p^2 f''(p), bounded for any p in [0, 1] and gamma >= 0 (0 at p = 1 for
    gamma > 0; q for gamma = 0): -q (1 - p)^gamma (gamma (gamma - 1) p^2 log p
    - 2 gamma p (1 - p) - (1 - p)^2)."""
    return -qk * mod * (gamma * (gamma - 1.0) * pk * pk * logp - 2.0 * gamma * pk * omp
                        - omp * omp)
