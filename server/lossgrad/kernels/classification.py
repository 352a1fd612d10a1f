"""Classification losses: binary (per element) and multi-class (per row).

Binary functions return (loss, d loss / d x) for one element. Row functions take a row of
predictions ``x``, its targets, a gradient row ``g`` written as ``coef * d loss / d x``
when ``want_grad``, and return the row's loss. Everything is float64 inside.
"""

from __future__ import annotations

import math

import numba
from numba import types as nt

from ._numerics import (
    BLOCK,
    In,
    Out,
    b1,
    clog,
    clog_grad,
    f8,
    i8,
    inline,
    kernel,
    sigmoid,
    softplus,
)


@inline
def hinge(x, y, zero_one):  # type: ignore[no-untyped-def]
    """max(0, 1 - y x), y in {-1, 1} (mapped from {0, 1} when zero_one); 0 at the margin."""
    s = 2.0 * y - 1.0 if zero_one else y
    m = 1.0 - s * x
    if m > 0.0:
        return m, -s
    return 0.0, 0.0


@inline
def squared_hinge(x, y, zero_one):  # type: ignore[no-untyped-def]
    """max(0, 1 - y x)^2; gradient -2 y max(0, 1 - y x)."""
    s = 2.0 * y - 1.0 if zero_one else y
    m = max(1.0 - s * x, 0.0)
    return m * m, -2.0 * s * m


@inline
def bce(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """-[pw y log x + (1 - y) log(1 - x)] on probabilities, each log floored at -100.

    y is smoothed to y (1 - eps) + eps / 2 (Keras). The gradient is that of the floored
    expression: a term whose log is at the floor contributes 0.
    """
    t = y * (1.0 - smoothing) + 0.5 * smoothing
    loss = -(pos_weight * t * clog(x) + (1.0 - t) * clog(1.0 - x))
    grad = -pos_weight * t * clog_grad(x) + (1.0 - t) * clog_grad(1.0 - x)
    return loss, grad


@inline
def bce_logits(x, y, pos_weight, smoothing):  # type: ignore[no-untyped-def]
    """(1 - y) x + (1 + (pw - 1) y) softplus(-x) (PyTorch BCEWithLogitsLoss).

    Gradient (1 + (pw - 1) y) sigmoid(x) - pw y; finite for any finite x.
    """
    t = y * (1.0 - smoothing) + 0.5 * smoothing
    c = 1.0 + (pos_weight - 1.0) * t
    return (1.0 - t) * x + c * softplus(-x), c * sigmoid(x) - pos_weight * t


@inline
def row_max(x):  # type: ignore[no-untyped-def]
    m = -math.inf
    for k in range(x.size):
        m = max(m, x[k])
    return m


@inline
def row_sum_exp(x, m):  # type: ignore[no-untyped-def]
    s = 0.0
    for k in range(x.size):
        s += math.exp(x[k] - m)
    return s


@inline
def cce_logits_row(x, q, g, coef, smoothing, want_grad):  # type: ignore[no-untyped-def]
    """sum_k q'_k (LSE(x) - x_k), q' = (1 - eps) q + eps / C (PyTorch CrossEntropyLoss).

    Gradient (sum q') softmax(x) - q'.
    """
    c = x.size
    m = row_max(x)
    s = row_sum_exp(x, m)
    lse = m + math.log(s)
    loss = 0.0
    total_q = 0.0
    for k in range(c):
        qk = (1.0 - smoothing) * q[k] + smoothing / c
        total_q += qk
        loss += qk * (lse - x[k])
    if want_grad:
        for k in range(c):
            qk = (1.0 - smoothing) * q[k] + smoothing / c
            g[k] = coef * (total_q * (math.exp(x[k] - m) / s) - qk)
    return loss


@inline
def cce_probs_row(x, q, g, coef, smoothing, want_grad):  # type: ignore[no-untyped-def]
    """-sum_k q'_k log x_k with log floored at -100 (NLL of log x; no renormalisation)."""
    c = x.size
    loss = 0.0
    for k in range(c):
        qk = (1.0 - smoothing) * q[k] + smoothing / c
        loss -= qk * clog(x[k])
        if want_grad:
            g[k] = -coef * qk * clog_grad(x[k])
    return loss


SPARSE_LOGITS = 0
SPARSE_PROBS = 1


@kernel(lambda F: f8(In(F, 2), In(i8), In(f8), In(f8), Out(F), Out(F, 2), f8, i8, f8, i8, b1))
def sparse_rows(x, y, s, cw, out, grad, scale, ignore, smoothing, op, want_grad):  # type: ignore[no-untyped-def]
    """Cross-entropy against class indices, PyTorch's definition (LossNLL.cpp).

    Row loss (1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c), with p = softmax(x)
    for SPARSE_LOGITS and p = x (log floored at -100) for SPARSE_PROBS; w = class weights.
    Rows whose target is ``ignore`` contribute 0. ``s`` holds per-row sample weights.
    Returns sum_i s_i l_i; ``grad`` rows get scale s_i d l_i / d x.
    """
    rows, c = x.shape
    has_s = s.size > 0
    has_cw = cw.size > 0
    want_out = out.size > 0
    total_cw = 0.0
    for k in range(c):
        total_cw += cw[k] if has_cw else 1.0
    spread = smoothing / c
    per_block = max(1, BLOCK // c)
    total = 0.0
    for lo in range(0, rows, per_block):
        acc = 0.0
        for i in range(lo, min(lo + per_block, rows)):
            yi = y[i]
            xi = x[i]
            gi = grad[i] if want_grad else grad[0]
            if yi == ignore:
                if want_out:
                    out[i] = 0.0
                if want_grad:
                    gi[:] = 0.0
                continue
            wy = cw[yi] if has_cw else 1.0
            si = s[i] if has_s else 1.0
            coef = scale * si
            loss = 0.0
            if op == SPARSE_LOGITS:
                m = row_max(xi)
                se = row_sum_exp(xi, m)
                lse = m + math.log(se)
                loss = (1.0 - smoothing) * wy * (lse - xi[yi])
                if smoothing > 0.0:
                    part = 0.0
                    for k in range(c):
                        part += (cw[k] if has_cw else 1.0) * (lse - xi[k])
                    loss += spread * part
                if want_grad:
                    a = (1.0 - smoothing) * wy + spread * total_cw
                    for k in range(c):
                        gk = a * (math.exp(xi[k] - m) / se) - spread * (cw[k] if has_cw else 1.0)
                        if k == yi:
                            gk -= (1.0 - smoothing) * wy
                        gi[k] = coef * gk
            else:
                loss = -(1.0 - smoothing) * wy * clog(xi[yi])
                if smoothing > 0.0:
                    part = 0.0
                    for k in range(c):
                        part -= (cw[k] if has_cw else 1.0) * clog(xi[k])
                    loss += spread * part
                if want_grad:
                    for k in range(c):
                        a = spread * (cw[k] if has_cw else 1.0)
                        if k == yi:
                            a += (1.0 - smoothing) * wy
                        gi[k] = -coef * a * clog_grad(xi[k])
            acc += si * loss
            if want_out:
                out[i] = si * loss
        total += acc
    return total


@numba.njit(nt.Tuple((i8, f8, i8))(In(i8), i8, i8, In(f8), In(f8)), nogil=True, cache=True)
def label_stats(y, c, ignore, cw, s):  # type: ignore[no-untyped-def]
    """Check class indices and sum the row weights s_i w_{y_i} of non-ignored rows.

    Returns (first index out of [0, c) that is not ``ignore``, or -1; weight sum; rows
    with non-zero weight).
    """
    has_s = s.size > 0
    has_cw = cw.size > 0
    total = 0.0
    count = 0
    n = y.size
    for lo in range(0, n, BLOCK):
        acc = 0.0
        for k in range(lo, min(lo + BLOCK, n)):
            yk = y[k]
            if yk == ignore:
                continue
            if yk < 0 or yk >= c:
                return k, 0.0, 0
            wk = (cw[yk] if has_cw else 1.0) * (s[k] if has_s else 1.0)
            acc += wk
            if wk > 0.0:
                count += 1
        total += acc
    return -1, total, count


@kernel(lambda F: nt.Tuple((i8, i8))(In(F)))
def signed_label_mode(t):  # type: ignore[no-untyped-def]
    """(mode, bad index): mode 0 when all t in {-1, 1}, 1 when all in {0, 1}, -1 if neither."""
    seen_zero = -1
    seen_minus = -1
    for k in range(t.size):
        v = t[k]
        if v == 0.0:
            if seen_minus >= 0:
                return -1, k
            if seen_zero < 0:
                seen_zero = k
        elif v == -1.0:
            if seen_zero >= 0:
                return -1, k
            if seen_minus < 0:
                seen_minus = k
        elif v != 1.0:
            return -1, k
    return (1 if seen_zero >= 0 else 0), -1
