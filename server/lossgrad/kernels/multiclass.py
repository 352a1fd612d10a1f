"""More per-row losses: NLL of log-probabilities, multi-class hinges, cosine similarity.

Row functions follow the contracts of ``classification.py``: dense rows take
(x, t, g, e, h, coef, a, strict, want_grad), rows against a class index take
(x, yi, cw, total_w, g, e, h, coef, smoothing, strict, want_grad); both return the row's
loss as float64 (NaN when an input is invalid) and write ``coef * d loss / d x`` to ``g``
when ``want_grad``. Sums over a row are float64.
"""

from __future__ import annotations

import math

import numpy as np

from ._numerics import block_sum, clip, fconst, inline, maxnum, nonfinite, vector_poison

COSINE_EPSILON = 1e-7  # keras.ops.normalize: x / max(||x||, 1e-7)


@inline
def _row_poison(x, strict):  # type: ignore[no-untyped-def]
    """NaN when the row holds a NaN/Inf and ``strict``, else 0."""
    return vector_poison(x) if strict else 0.0


@inline
def nll_row(x, yi, cw, total_w, g, e, h, coef, smoothing, strict,  # type: ignore[no-untyped-def]
            want_grad):
    """(1 - eps) w_y (-x_y) + (eps / C) sum_c w_c (-x_c) for log-probabilities x (PyTorch
    NLLLoss; eps = 0 unless label smoothing is asked for, then PyTorch's two-term form).

    Gradient -(1 - eps) w_y at the label and -(eps / C) w_c everywhere.
    """
    c = x.size
    has_cw = cw.size > 0
    wy = cw[yi] if has_cw else 1.0
    spread = smoothing / c
    if want_grad:  # the input check rides along the gradient's stores: one pass, not two
        bad = 0
        for k in range(c):
            g[k] = fconst(x, -coef * spread * (cw[k] if has_cw else 1.0))
            if strict:
                bad += nonfinite(x[k])
        g[yi] -= fconst(x, coef * (1.0 - smoothing) * wy)
        poisoned = math.nan if bad else 0.0
    else:
        poisoned = _row_poison(x, strict)
    loss = -(1.0 - smoothing) * wy * np.float64(x[yi]) + poisoned
    if smoothing > 0.0:
        for k in range(c):
            h[k] = (cw[k] if has_cw else 1.0) * np.float64(x[k])
        loss -= spread * block_sum(h)
    return loss


_SHORT_ROW = 16  # rows shorter than this find their max in one scalar scan


@inline
def _first_max(v, skip):  # type: ignore[no-untyped-def]
    """(index, value) of the first largest v_k over k != skip; (-1, -inf) if none. NaNs
    are passed over (a row of them gives its first candidate; a strict call has already
    made its loss NaN). Two passes that vectorise, a running ``maxnum`` and then the
    first index holding the max, rather than one branching scan."""
    first = 1 if skip == 0 else 0
    if first >= v.size:
        return -1, -math.inf
    best = np.float64(v[first])
    if v.size < _SHORT_ROW:  # too short for a vector: one scan, the same result
        at = first
        for k in range(first + 1, v.size):
            vk = np.float64(v[k])
            if k != skip and (vk > best or (best != best and vk == vk)):
                best = vk
                at = k
        return at, best
    for k in range(v.size):
        best = maxnum(best, np.float64(v[k]) if k != skip else -math.inf)
    at = v.size
    for k in range(v.size):
        at = min(at, k if (np.float64(v[k]) == best) & (k != skip) else v.size)
    return (first, np.float64(v[first])) if at == v.size else (at, best)  # none: all NaN


@inline
def multiclass_hinge_row(x, yi, cw, total_w, g, e, h, coef, smoothing,  # type: ignore[no-untyped-def]
                         strict, want_grad):
    """w_y max(0, 1 + max_{k != y} x_k - x_y): the Crammer-Singer hinge (optax
    multiclass_hinge_loss, scikit-learn hinge_loss with several classes).

    Gradient w_y at the first k != y with the largest score and -w_y at y while the margin
    is violated (> 0); 0 otherwise (0 at the kink).
    """
    wy = cw[yi] if cw.size > 0 else 1.0
    at, best = _first_max(x, yi)
    margin = 1.0 + best - np.float64(x[yi])
    active = margin > 0.0
    if want_grad:
        for k in range(x.size):
            g[k] = fconst(x, 0.0)
        if active:
            g[at] = fconst(x, coef * wy)
            g[yi] = fconst(x, -coef * wy)
    return wy * (margin if active else 0.0) + _row_poison(x, strict)


@inline
def categorical_hinge_row(x, t, g, e, h, coef, unused, strict, want_grad):  # type: ignore[no-untyped-def]
    """max(0, neg - pos + 1), pos = sum_k t_k x_k, neg = max_k (1 - t_k) x_k (Keras
    CategoricalHinge; with one-hot t the true class puts a 0 into the max, so neg >= 0).

    Gradient (1 - t_j) [j = k*] - t_j while the hinge is active (> 0), k* the first index
    of the max; 0 otherwise.
    """
    c = x.size
    for k in range(c):
        h[k] = np.float64(t[k]) * np.float64(x[k])
    pos = block_sum(h)
    for k in range(c):
        h[k] = (1.0 - np.float64(t[k])) * np.float64(x[k])
    at, neg = _first_max(h, -1)
    margin = neg - pos + 1.0
    active = margin > 0.0
    if want_grad:
        cf = fconst(x, coef if active else 0.0)
        for k in range(c):
            g[k] = -cf * t[k]
        if active:
            g[at] += fconst(x, coef * (1.0 - np.float64(t[at])))
    return (margin if active else 0.0) + _row_poison(t, strict) + _row_poison(x, strict)


@inline
def _sum_products(a, b, h):  # type: ignore[no-untyped-def]
    for k in range(a.size):
        h[k] = np.float64(a[k]) * np.float64(b[k])
    return block_sum(h)


@inline
def cosine_similarity_row(x, t, g, e, h, coef, unused, strict, want_grad):  # type: ignore[no-untyped-def]
    """-cos(x, t) = -(x / ||x||_e) . (t / ||t||_e), ||v||_e = max(||v||, 1e-7) (Keras
    CosineSimilarity: minimised at -1; a zero vector gives 0).

    Gradient -(t / ||t||_e - cos x / ||x||) / ||x|| where ||x|| > 1e-7, and
    -t / (||t||_e 1e-7) where the floor is active.
    """
    sxx = _sum_products(x, x, h)
    stt = _sum_products(t, t, h)
    sxt = _sum_products(x, t, h)
    floor = COSINE_EPSILON * COSINE_EPSILON
    nx = math.sqrt(max(sxx, floor))
    nt = math.sqrt(max(stt, floor))
    loss = -sxt / (nx * nt)
    if want_grad:
        a = fconst(x, -coef / (nx * nt))
        b = fconst(x, coef * loss / (nx * nx) if sxx > floor else 0.0)  # -cos / ||x||^2
        for k in range(x.size):
            g[k] = a * t[k] - b * x[k]
    return loss + _row_poison(t, strict) + _row_poison(x, strict)


# --- with the diagonal Hessian (``second_order.py``) ----------------------------------------

@inline
def _constant_hessian(hs, coef, lo, hi):  # type: ignore[no-untyped-def]
    """hs = coef * clip(0): the loss is piecewise linear in the predictions."""
    v = fconst(hs, coef * clip(0.0, lo, hi))
    for k in range(hs.size):
        hs[k] = v


@inline
def nll_row_hessian(x, yi, cw, total_w, g, hs, e, h, coef, smoothing, lo, hi,  # type: ignore[no-untyped-def]
                    strict):
    """0: linear in the log-probabilities."""
    loss = nll_row(x, yi, cw, total_w, g, e, h, coef, smoothing, strict, True)
    _constant_hessian(hs, coef, lo, hi)
    return loss


@inline
def multiclass_hinge_row_hessian(x, yi, cw, total_w, g, hs, e, h, coef, smoothing, lo,  # type: ignore[no-untyped-def]
                                 hi, strict):
    """0: piecewise linear."""
    loss = multiclass_hinge_row(x, yi, cw, total_w, g, e, h, coef, smoothing, strict, True)
    _constant_hessian(hs, coef, lo, hi)
    return loss


@inline
def categorical_hinge_row_hessian(x, t, g, hs, e, h, coef, unused, lo, hi, strict):  # type: ignore[no-untyped-def]
    """0: piecewise linear."""
    loss = categorical_hinge_row(x, t, g, e, h, coef, unused, strict, True)
    _constant_hessian(hs, coef, lo, hi)
    return loss


@inline
def cosine_similarity_row_hessian(x, t, g, hs, e, h, coef, unused, lo, hi, strict):  # type: ignore[no-untyped-def]
    """2 u_k x_k / n^3 + (x . u)(1 / n^3 - 3 x_k^2 / n^5), n = ||x||, u = t / ||t||_e (the
    diagonal of a dense Hessian); 0 where the norm floor is active."""
    loss = cosine_similarity_row(x, t, g, e, h, coef, unused, strict, True)
    sxx = _sum_products(x, x, h)
    stt = _sum_products(t, t, h)
    sxt = _sum_products(x, t, h)
    floor = COSINE_EPSILON * COSINE_EPSILON
    nt = math.sqrt(max(stt, floor))
    n = math.sqrt(sxx)
    n3 = n * n * n
    xu = sxt / nt
    for k in range(x.size):
        xk = np.float64(x[k])
        uk = np.float64(t[k]) / nt
        hk = 2.0 * uk * xk / n3 + xu * (1.0 / n3 - 3.0 * xk * xk / (n3 * n * n))
        hs[k] = fconst(x, coef * clip(hk if sxx > floor else 0.0, lo, hi))
    return loss
