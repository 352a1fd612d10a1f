"""Classification losses: binary (per element) and multi-class (per row).

Binary functions take (x, y, a, b) in the predictions' float type and return
(loss, d loss / d x). Row functions take a row of predictions ``x``, its targets, a
gradient row ``g`` (written as ``coef * d loss / d x`` when ``want_grad``) and two scratch
rows (``e`` in the row's type, ``h`` float64), and return the row loss as float64.
Invalid inputs make the returned loss NaN (see ``_numerics.poison``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types as nt

from ._explog import clog, fexp_nonpositive, flog1p_unit
from ._numerics import (
    BLOCK,
    In,
    block_sum,
    clip,
    f8,
    fconst,
    i8,
    inline,
    maxnum,
    outside_unit,
    poison,
    saturate,
    sum_add,
    unit_poison,
)


@inline
def _smooth(y, smoothing):  # type: ignore[no-untyped-def]
    """Binary label smoothing y (1 - eps) + eps / 2 (Keras)."""
    return y * (fconst(y, 1.0) - smoothing) + fconst(y, 0.5) * smoothing


@inline
def bce(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """-[pw y log x + (1 - y) log(1 - x)] on probabilities, each log floored at -100
    (PyTorch BCELoss). The gradient is that of the floored expression: a term at the
    floor contributes 0."""
    t = _smooth(y, smoothing)
    one = fconst(x, 1.0)
    lp, dlp = clog(x)  # NaN for x < 0
    lq, dlq = clog(one - x)  # NaN for x > 1
    loss = -(pos_weight * t * lp + (one - t) * lq) + unit_poison(y)
    return loss, saturate((one - t) * dlq - pos_weight * t * dlp, x)


@inline
def bce_logits(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """pw y softplus(-x) + (1 - y) softplus(x) (PyTorch BCEWithLogitsLoss).

    Both terms are >= 0, so there is no cancellation; finite for any finite x. Gradient
    (1 + (pw - 1) y) sigmoid(x) - pw y.
    """
    t = _smooth(y, smoothing)
    one = fconst(x, 1.0)
    zero = fconst(x, 0.0)
    e = fexp_nonpositive(-abs(x))
    r = one / (one + e)
    lg = flog1p_unit(e)
    sp_pos = max(x, zero) + lg  # softplus(x)
    sp_neg = max(-x, zero) + lg  # softplus(-x)
    sig = (one if x >= zero else e) * r
    loss = pos_weight * t * sp_neg + (one - t) * sp_pos + unit_poison(y)
    return loss, (one + (pos_weight - one) * t) * sig - pos_weight * t


@inline
def bce_hessian(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """pw t / x^2 + (1 - t) / (1 - x)^2: each term is 0 where its log floor is active
    (the derivative of the gradient of the floored expression). Formed in float64, where
    1 / x^2 stays finite down to the floor, then saturated to the predictions' type."""
    t = np.float64(_smooth(y, smoothing))
    _, dlp = clog(np.float64(x))
    _, dlq = clog(1.0 - np.float64(x))
    return fconst(x, saturate(pos_weight * t * dlp * dlp + (1.0 - t) * dlq * dlq, x))


@inline
def bce_logits_hessian(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """(1 + (pw - 1) t) sigmoid(x) (1 - sigmoid(x)), written e / (1 + e)^2 with
    e = exp(-|x|): no cancellation, and 0 only where it underflows."""
    t = _smooth(y, smoothing)
    one = fconst(x, 1.0)
    e = fexp_nonpositive(-abs(x))
    r = one / (one + e)
    return (one + (pos_weight - one) * t) * (e * r * r)


@inline
def _row_max(x):  # type: ignore[no-untyped-def]
    """max of a row, vectorised; NaNs are skipped here and caught by ``poison`` after."""
    m = x[0]
    for k in range(1, x.size):
        m = maxnum(m, x[k])
    return m


@numba.njit(nogil=True, error_model="numpy", fastmath={"reassoc"})
def _count_max(x, m):  # type: ignore[no-untyped-def]
    """How many x_k equal m, counted in x's float type (exact below 2^24 positions). A
    pass of its own: counted in the exp loop, the integer sum slows it down by ~15 %."""
    n = fconst(x, 0.0)
    for k in range(x.size):
        n += fconst(x, 1.0) if x[k] == m else fconst(x, 0.0)
    return n


@inline
def _shifted_exp(xk, m, strict):  # type: ignore[no-untyped-def]
    """(exp(xk - m), and the same but 0 at the maximum, NaN for a NaN/Inf when strict)."""
    d = xk - m
    ek = fexp_nonpositive(d)  # exactly 1 at d = 0
    zeroed = fconst(d, 0.0) if d == fconst(d, 0.0) else ek
    return ek, (zeroed + poison(xk) if strict else zeroed)


@inline
def softmax_row(x, e, u, want_u, strict):  # type: ignore[no-untyped-def]
    """Write e_k = exp(x_k - m), 0 at the maxima, and if ``want_u`` u_k = exp(x_k - m)
    (the gradient row); return (m, s1) where s1 = sum_k exp(x_k - m) - 1 as float64 (NaN
    if the row has a NaN/Inf).

    s1 leaves out one exp(0) = 1 exactly, so LSE(x) - x_k = (m - x_k) + log1p(s1) keeps
    full relative precision for confident rows.
    """
    m = _row_max(x)
    if want_u:
        for k in range(x.size):
            uk, ek = _shifted_exp(x[k], m, strict)
            u[k] = uk
            e[k] = ek
    else:  # a loop of its own: one that may write u = e does not vectorise
        for k in range(x.size):
            _, ek = _shifted_exp(x[k], m, strict)
            e[k] = ek
    return m, block_sum(e) + (np.float64(_count_max(x, m)) - 1.0)


@inline
def unnormalised(e, x, m, k):  # type: ignore[no-untyped-def]
    """exp(x_k - m) from the exps of ``softmax_row`` (which hold 0 at the maxima)."""
    return fconst(e, 1.0) if x[k] == m else e[k]


@inline
def cce_logits_row(x, q, g, e, h, coef, smoothing, strict, want_grad):  # type: ignore[no-untyped-def]
    """sum_k q'_k (LSE(x) - x_k), q' = (1 - eps) q + eps / C (PyTorch CrossEntropyLoss
    with probability targets). Gradient (sum q') softmax(x) - q'."""
    c = x.size
    m, s1 = softmax_row(x, e, g, want_grad, strict)
    keep = fconst(x, 1.0 - smoothing)
    spread = fconst(x, smoothing / c)
    total_q = 0.0
    cross = 0.0
    for k in range(c):  # stores nothing, so its sums' order is fixed (``sum_add``)
        qk = keep * q[k] + spread + unit_poison(q[k])
        total_q = sum_add(total_q, qk)
        cross = sum_add(cross, np.float64(qk) * (m - x[k]))
    loss = cross + total_q * np.log1p(s1)  # both parts >= 0
    if want_grad:
        a = fconst(x, coef * total_q / (1.0 + s1))
        cf = fconst(x, coef)
        for k in range(c):
            g[k] = a * g[k] - cf * (keep * q[k] + spread)
    return loss


@inline
def cce_probs_row(x, q, g, e, h, coef, smoothing, strict, want_grad):  # type: ignore[no-untyped-def]
    """-sum_k q'_k log x_k with log floored at -100 (the NLL of log x, no renormalisation)."""
    c = x.size
    keep = fconst(x, 1.0 - smoothing)
    spread = fconst(x, smoothing / c)
    cf = fconst(x, coef)
    for k in range(c):
        qk = keep * q[k] + spread
        lv, dlv = clog(x[k])
        e[k] = -qk * lv + unit_poison(x[k]) + unit_poison(q[k])
        if want_grad:
            g[k] = saturate(-cf * qk * dlv, x)
    return block_sum(e)


SPARSE_LOGITS = 0
SPARSE_PROBS = 1


@inline
def sparse_logits_row(x, yi, cw, total_w, g, e, h, coef, smoothing,  # type: ignore[no-untyped-def]
                      strict, want_grad):
    """(1 - eps) w_y (LSE - x_y) + (eps / C) sum_c w_c (LSE - x_c) (PyTorch LossNLL.cpp).

    Gradient p * ((1 - eps) w_y + (eps / C) sum w) - (1 - eps) w_y e_y - (eps / C) w.
    """
    c = x.size
    has_cw = cw.size > 0
    m, s1 = softmax_row(x, e, g, want_grad, strict)
    lse_m = np.log1p(s1)
    wy = cw[yi] if has_cw else 1.0
    spread = smoothing / c
    loss = (1.0 - smoothing) * wy * ((m - x[yi]) + lse_m)
    if smoothing > 0.0:
        for k in range(c):
            h[k] = (fconst(x, cw[k]) if has_cw else fconst(x, 1.0)) * (m - x[k])
        loss += spread * (block_sum(h) + total_w * lse_m)
    if want_grad:
        a = fconst(x, coef * ((1.0 - smoothing) * wy + spread * total_w) / (1.0 + s1))
        b = fconst(x, coef * spread)
        if has_cw:
            for k in range(c):
                g[k] = a * g[k] - b * fconst(x, cw[k])
        else:
            for k in range(c):
                g[k] = a * g[k] - b
        g[yi] -= fconst(x, coef * (1.0 - smoothing) * wy)
    return loss


@inline
def sparse_probs_row(x, yi, cw, total_w, g, e, h, coef, smoothing,  # type: ignore[no-untyped-def]
                     strict, want_grad):
    """(1 - eps) w_y (-log x_y) + (eps / C) sum_c w_c (-log x_c), logs floored at -100
    (PyTorch NLLLoss of the floored log)."""
    c = x.size
    has_cw = cw.size > 0
    bad = 0  # values outside [0, 1] or not finite, counted along the gradient's stores
    for k in range(c):
        if want_grad:
            g[k] = fconst(x, 0.0)
        bad += outside_unit(x[k])
    wy = cw[yi] if has_cw else 1.0
    spread = smoothing / c
    lv, dlv = clog(x[yi])
    loss = -(1.0 - smoothing) * wy * lv + (math.nan if bad else 0.0)
    if smoothing > 0.0:
        b = fconst(x, coef * spread)
        for k in range(c):
            wk = fconst(x, cw[k]) if has_cw else fconst(x, 1.0)
            lk, dk = clog(x[k])
            e[k] = -wk * lk
            if want_grad:
                g[k] = saturate(-b * wk * dk, x)
        loss += spread * block_sum(e)
    if want_grad:
        g[yi] = saturate(g[yi] - fconst(x, coef * (1.0 - smoothing) * wy) * dlv, x)
    return loss


@numba.njit(nt.Tuple((i8, f8, f8, i8))(In(i8), i8, i8, In(f8), In(f8), i8, f8, f8),
            nogil=True, cache=True)
def label_stats(y, c, ignore, cw, s, offset, total, acc):  # type: ignore[no-untyped-def]
    """Check class indices and sum the row weights s_i w_{y_i} of non-ignored rows.

    Returns (first index out of [0, c) that is not ``ignore``, or -1; total; acc; rows
    with non-zero weight). The sum is ``total + acc``, over blocks of BLOCK rows aligned
    to absolute rows, resumable as ``_numerics.weight_stats`` is (``y`` starts at row
    ``offset``).
    """
    has_s = s.size > 0
    has_cw = cw.size > 0
    count = 0
    n = y.size
    k = 0
    while k < n:
        end = min(n, k + BLOCK - (offset + k) % BLOCK)
        for j in range(k, end):
            yj = y[j]
            if yj == ignore:
                continue
            if yj < 0 or yj >= c:
                return j, 0.0, 0.0, 0
            wj = (cw[yj] if has_cw else 1.0) * (s[j] if has_s else 1.0)
            acc += wj
            if wj > 0.0:
                count += 1
        if (offset + end) % BLOCK == 0:
            total += acc
            acc = 0.0
        k = end
    return -1, total, acc, count


# --- rows with the diagonal Hessian (the Hessian path, ``second_order.py``) ---------------
# Each runs its row function above with the gradient, then writes
# hs_k = coef * clip(d^2 loss / d x_k^2, lo, hi) in the row's type; the second derivative
# is formed in float64.

@inline
def _softmax_hessian(x, e, h, hs, coef, total, lo, hi):  # type: ignore[no-untyped-def]
    """hs_k = coef * clip(total * p_k (1 - p_k)), p = softmax(x), from the exps that
    ``softmax_row`` left in ``e``."""
    m = _row_max(x)
    for k in range(x.size):
        h[k] = unnormalised(e, x, m, k)
    z = block_sum(h)
    for k in range(x.size):
        p = h[k] / z
        hs[k] = coef * clip(total * p * (1.0 - p), lo, hi)


@inline
def cce_logits_row_hessian(x, q, g, hs, e, h, coef, smoothing, lo, hi,  # type: ignore[no-untyped-def]
                           strict):
    """Diagonal (sum q') p_k (1 - p_k) of the Hessian (sum q') (diag p - p p^T)."""
    loss = cce_logits_row(x, q, g, e, h, coef, smoothing, strict, True)
    spread = smoothing / x.size
    total_q = 0.0
    for k in range(x.size):
        total_q += (1.0 - smoothing) * q[k] + spread
    _softmax_hessian(x, e, h, hs, coef, total_q, lo, hi)
    return loss


@inline
def cce_probs_row_hessian(x, q, g, hs, e, h, coef, smoothing, lo, hi,  # type: ignore[no-untyped-def]
                          strict):
    """q'_k / x_k^2, 0 where the log floor is active."""
    loss = cce_probs_row(x, q, g, e, h, coef, smoothing, strict, True)
    spread = smoothing / x.size
    for k in range(x.size):
        _, d = clog(np.float64(x[k]))
        hk = ((1.0 - smoothing) * q[k] + spread) * d * d
        hs[k] = saturate(coef * clip(hk, lo, hi), x)
    return loss


@inline
def sparse_logits_row_hessian(x, yi, cw, total_w, g, hs, e, h, coef,  # type: ignore[no-untyped-def]
                              smoothing, lo, hi, strict):
    """((1 - eps) w_y + (eps / C) sum w) p_k (1 - p_k): the diagonal of that factor
    times (diag p - p p^T)."""
    loss = sparse_logits_row(x, yi, cw, total_w, g, e, h, coef, smoothing, strict, True)
    wy = cw[yi] if cw.size > 0 else 1.0
    _softmax_hessian(x, e, h, hs, coef, (1.0 - smoothing) * wy + smoothing / x.size * total_w,
                     lo, hi)
    return loss


@inline
def sparse_probs_row_hessian(x, yi, cw, total_w, g, hs, e, h, coef,  # type: ignore[no-untyped-def]
                             smoothing, lo, hi, strict):
    """((1 - eps) w_y [k = y] + (eps / C) w_k) / x_k^2, 0 where the log floor is active."""
    loss = sparse_probs_row(x, yi, cw, total_w, g, e, h, coef, smoothing, strict, True)
    has_cw = cw.size > 0
    spread = smoothing / x.size
    for k in range(x.size):
        a = spread * (cw[k] if has_cw else 1.0)
        if k == yi:
            a += (1.0 - smoothing) * (cw[yi] if has_cw else 1.0)
        _, d = clog(np.float64(x[k]))
        hs[k] = saturate(coef * clip(a * d * d, lo, hi), x)
    return loss
