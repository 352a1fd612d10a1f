"""Drivers of the Hessian path: loss, gradient and diagonal Hessian in one pass.

They mirror ``drivers.py`` and ``rows.py`` (same blocks, same fixed-order sums, same op
numbers, same poisoning of invalid inputs) and are separate kernels, so the gradient-only
path is compiled and runs exactly as before. On top of ``grad`` they write
``hess = scale * w * clip(d^2 loss / d x^2, lo, hi)``, where ``bounds = [lo, hi]`` is how
the engine asks for a Hessian mode: exact ``[-inf, inf]``, clipped ``[floor, inf]``,
constant ``[c, c]``. The per-loss second derivatives sit next to their losses
(``*_hessian`` in the family modules).
"""

from __future__ import annotations

import numba
import numpy as np

from ._numerics import (
    BLOCK,
    In,
    Out,
    b1,
    block_sum,
    clip,
    f8,
    fconst,
    i8,
    kernel,
    poison,
    vector_poison,
)
from .classification import (
    SPARSE_LOGITS,
    bce,
    bce_hessian,
    bce_logits,
    bce_logits_hessian,
    cce_logits_row_hessian,
    cce_probs_row_hessian,
    sparse_logits_row_hessian,
    sparse_probs_row_hessian,
)
from .divergence import kl_log_row_hessian, kl_probs_row_hessian
from .drivers import (
    BCE,
    BCE_LOGITS,
    HINGE,
    HUBER,
    LOG_COSH,
    MAE,
    MAPE,
    MSE,
    MSLE,
    POISSON_DEVIANCE,
    POISSON_LOG,
    POISSON_RATE,
    PSEUDO_HUBER,
    QUANTILE,
    SIGMOID_FOCAL,
    SMOOTH_L1,
    SQUARED_HINGE,
    TWEEDIE,
    _combine,
    _tasks,
    block_views,
    loop,
    scratch_blocks,
)
from .focal import sigmoid_focal, sigmoid_focal_hessian, softmax_focal_row_hessian
from .likelihood import (
    gamma_deviance,
    gamma_deviance_hessian,
    poisson_deviance,
    poisson_deviance_hessian,
    poisson_log,
    poisson_log_hessian,
    poisson_rate,
    poisson_rate_hessian,
    tweedie,
    tweedie_hessian,
    tweedie_three_halves,
)
from .margin import hinge, hinge_hessian, squared_hinge, squared_hinge_hessian
from .multiclass import (
    categorical_hinge_row_hessian,
    cosine_similarity_row_hessian,
    multiclass_hinge_row_hessian,
    nll_row_hessian,
)
from .regression import (
    huber,
    huber_hessian,
    mae,
    mae_hessian,
    mse,
    mse_hessian,
    pseudo_huber,
    pseudo_huber_hessian,
)
from .robust import (
    log_cosh,
    log_cosh_hessian,
    mape,
    msle,
    msle_hessian,
    quantile,
    smooth_l1,
    smooth_l1_hessian,
    zero_hessian,
)
from .rows import (
    CATEGORICAL_HINGE,
    CCE_LOGITS,
    CCE_PROBS,
    COSINE_SIMILARITY,
    KL_LOG,
    KL_PROBS,
    MULTICLASS_HINGE,
    NLL,
    class_weight_total,
    row_block_count,
    row_span,
    scratch_rows,
)

# --- elementwise ---------------------------------------------------------------------


@loop
def _element_loop(elem, second, x, y, w, lb, out, grad, hess, scale, a, b, lo, hi, strict):  # type: ignore[no-untyped-def]
    """One block: ``drivers._element_loop`` plus the clipped second derivative."""
    sc = fconst(x, scale)
    for j in range(x.size):
        xj = x[j]
        yj = y[j]
        loss, g = elem(xj, yj, a, b)
        bad = poison(xj) + poison(yj)
        lb[j] = loss + (bad if strict else fconst(xj, 0.0))
        grad[j] = sc * g
        hess[j] = sc * clip(second(xj, yj, a, b), lo, hi)
    if w.size:
        for j in range(x.size):
            wj = fconst(x, w[j])
            lb[j] *= wj
            grad[j] *= wj
            hess[j] *= wj
    if out.size:
        for j in range(x.size):
            out[j] = lb[j]


@numba.njit(nogil=True, error_model="numpy")
def _element_block(blk, op, x, y, w, out, grad, hess, scale, a, b, bounds, strict,  # type: ignore[no-untyped-def]
                   losses):
    xb, yb, wb, ob, gb, lb = block_views(blk, x, y, w, out, grad, losses, losses)
    hb = hess[blk * BLOCK:blk * BLOCK + xb.size]
    fa, fb = fconst(x, a), fconst(x, b)
    lo, hi = fconst(x, bounds[0]), fconst(x, bounds[1])
    if op == MAE:
        _element_loop(mae, mae_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == MSE:
        _element_loop(mse, mse_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == HUBER:
        _element_loop(huber, huber_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == PSEUDO_HUBER:
        _element_loop(pseudo_huber, pseudo_huber_hessian, xb, yb, wb, lb, ob, gb, hb, scale,
                      fa, fb, lo, hi, strict)
    elif op == HINGE:
        _element_loop(hinge, hinge_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == SQUARED_HINGE:
        _element_loop(squared_hinge, squared_hinge_hessian, xb, yb, wb, lb, ob, gb, hb, scale,
                      fa, fb, lo, hi, strict)
    elif op == BCE:
        _element_loop(bce, bce_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == BCE_LOGITS:
        _element_loop(bce_logits, bce_logits_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa,
                      fb, lo, hi, strict)
    elif op == SMOOTH_L1:
        _element_loop(smooth_l1, smooth_l1_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb,
                      lo, hi, strict)
    elif op == LOG_COSH:
        _element_loop(log_cosh, log_cosh_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb,
                      lo, hi, strict)
    elif op == QUANTILE:
        _element_loop(quantile, zero_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo,
                      hi, strict)
    elif op == MAPE:
        _element_loop(mape, zero_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == MSLE:
        _element_loop(msle, msle_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo, hi,
                      strict)
    elif op == POISSON_LOG:
        _element_loop(poisson_log, poisson_log_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa,
                      fb, lo, hi, strict)
    elif op == POISSON_RATE:
        _element_loop(poisson_rate, poisson_rate_hessian, xb, yb, wb, lb, ob, gb, hb, scale,
                      fa, fb, lo, hi, strict)
    elif op == TWEEDIE and a == 1.5:  # the gradient path's kernel, so the same loss bits
        _element_loop(tweedie_three_halves, tweedie_hessian, xb, yb, wb, lb, ob, gb, hb, scale,
                      fa, fb, lo, hi, strict)
    elif op == TWEEDIE:
        _element_loop(tweedie, tweedie_hessian, xb, yb, wb, lb, ob, gb, hb, scale, fa, fb, lo,
                      hi, strict)
    elif op == POISSON_DEVIANCE:
        _element_loop(poisson_deviance, poisson_deviance_hessian, xb, yb, wb, lb, ob, gb, hb,
                      scale, fa, fb, lo, hi, strict)
    elif op == SIGMOID_FOCAL:
        _element_loop(sigmoid_focal, sigmoid_focal_hessian, xb, yb, wb, lb, ob, gb, hb, scale,
                      fa, fb, lo, hi, strict)
    else:  # GAMMA_DEVIANCE
        _element_loop(gamma_deviance, gamma_deviance_hessian, xb, yb, wb, lb, ob, gb, hb,
                      scale, fa, fb, lo, hi, strict)
    return block_sum(lb)


@numba.njit(nogil=True, error_model="numpy")
def _element_blocks(first, last, sums, op, x, y, w, out, grad, hess, scale, a, b, bounds,  # type: ignore[no-untyped-def]
                    strict):
    """Blocks ``first`` to ``last``, with one scratch block for their losses."""
    losses, _ = scratch_blocks(x, grad)
    for blk in range(first, last):
        sums[blk] = _element_block(blk, op, x, y, w, out, grad, hess, scale, a, b, bounds,
                                   strict, losses)


@kernel(lambda F: f8(In(F), In(F), In(f8), Out(F), Out(F), Out(F), f8, i8, f8, f8, In(f8), b1,
                     b1), parallel=True)
def elementwise(x, y, w, out, grad, hess, scale, op, a, b, bounds, strict, parallel):  # type: ignore[no-untyped-def]
    """``drivers.elementwise`` that also writes the Hessian to ``hess``."""
    nb = (x.size + BLOCK - 1) // BLOCK
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _element_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, y, w,
                            out, grad, hess, scale, a, b, bounds, strict)
    else:
        _element_blocks(0, nb, sums, op, x, y, w, out, grad, hess, scale, a, b, bounds, strict)
    return _combine(sums, 0.0)  # one unary call: the sum starts at 0


# --- rows against rows (dense targets) -------------------------------------------------

@loop
def _dense_loop(row, x, t, w, out, grad, hess, scale, a, lo, hi, strict, e, h):  # type: ignore[no-untyped-def]
    has_w = w.size > 0
    want_out = out.size > 0
    acc = 0.0
    for i in range(x.shape[0]):
        wi = w[i] if has_w else 1.0
        loss = wi * row(x[i], t[i], grad[i], hess[i], e, h, scale * wi, a, lo, hi, strict)
        acc += loss
        if want_out:
            out[i] = loss
    return acc


@numba.njit(nogil=True, error_model="numpy")
def _dense_block(blk, op, x, t, w, out, grad, hess, scale, a, bounds, strict, e, h):  # type: ignore[no-untyped-def]
    first, last = row_span(blk, x)
    xb, tb = x[first:last], t[first:last]
    wb = w[first:last] if w.size else w
    ob = out[first:last] if out.size else out
    gb, hb = grad[first:last], hess[first:last]
    lo, hi = bounds[0], bounds[1]
    if op == CCE_LOGITS:
        return _dense_loop(cce_logits_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo, hi,
                           strict, e, h)
    if op == CCE_PROBS:
        return _dense_loop(cce_probs_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo, hi,
                           strict, e, h)
    if op == KL_PROBS:
        return _dense_loop(kl_probs_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo, hi,
                           strict, e, h)
    if op == KL_LOG:
        return _dense_loop(kl_log_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo, hi,
                           strict, e, h)
    if op == CATEGORICAL_HINGE:
        return _dense_loop(categorical_hinge_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo,
                           hi, strict, e, h)
    if op == COSINE_SIMILARITY:
        return _dense_loop(cosine_similarity_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo,
                           hi, strict, e, h)
    return _dense_loop(softmax_focal_row_hessian, xb, tb, wb, ob, gb, hb, scale, a, lo, hi,
                       strict, e, h)


@numba.njit(nogil=True, error_model="numpy")
def _dense_blocks(first, last, sums, op, x, t, w, out, grad, hess, scale, a, bounds,  # type: ignore[no-untyped-def]
                  strict):
    """Blocks ``first`` to ``last``, with one pair of scratch rows for all of them."""
    e, h = scratch_rows(x)
    for blk in range(first, last):
        sums[blk] = _dense_block(blk, op, x, t, w, out, grad, hess, scale, a, bounds, strict,
                                 e, h)


@kernel(lambda F: f8(In(F, 2), In(F, 2), In(f8), Out(F), Out(F, 2), Out(F, 2), f8, i8, f8,
                     In(f8), b1, b1), parallel=True)
def dense_rows(x, t, w, out, grad, hess, scale, op, a, bounds, strict, parallel):  # type: ignore[no-untyped-def]
    """``rows.dense_rows`` that also writes the Hessian to ``hess``."""
    nb = row_block_count(x)
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _dense_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, t, w, out,
                          grad, hess, scale, a, bounds, strict)
    else:
        _dense_blocks(0, nb, sums, op, x, t, w, out, grad, hess, scale, a, bounds, strict)
    return _combine(sums, 0.0)  # one unary call: the sum starts at 0


# --- rows against class indices --------------------------------------------------------

@loop
def _sparse_loop(row, x, y, s, cw, total_w, out, grad, hess, scale, ignore, smoothing,  # type: ignore[no-untyped-def]
                 lo, hi, strict, e, h):
    has_s = s.size > 0
    want_out = out.size > 0
    acc = 0.0
    for i in range(x.shape[0]):
        yi = y[i]
        if yi == ignore:
            if strict:  # an ignored row still has to hold valid numbers
                acc += vector_poison(x[i])
            if want_out:
                out[i] = 0.0
            grad[i][:] = 0.0
            hess[i][:] = 0.0
            continue
        si = s[i] if has_s else 1.0
        loss = si * row(x[i], yi, cw, total_w, grad[i], hess[i], e, h, scale * si, smoothing,
                        lo, hi, strict)
        acc += loss
        if want_out:
            out[i] = loss
    return acc


@numba.njit(nogil=True, error_model="numpy")
def _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, hess, scale, ignore,  # type: ignore[no-untyped-def]
                  smoothing, bounds, strict, e, h):
    first, last = row_span(blk, x)
    xb, yb = x[first:last], y[first:last]
    sb = s[first:last] if s.size else s
    ob = out[first:last] if out.size else out
    gb, hb = grad[first:last], hess[first:last]
    lo, hi = bounds[0], bounds[1]
    if op == SPARSE_LOGITS:
        return _sparse_loop(sparse_logits_row_hessian, xb, yb, sb, cw, total_w, ob, gb, hb,
                            scale, ignore, smoothing, lo, hi, strict, e, h)
    if op == MULTICLASS_HINGE:
        return _sparse_loop(multiclass_hinge_row_hessian, xb, yb, sb, cw, total_w, ob, gb, hb,
                            scale, ignore, smoothing, lo, hi, strict, e, h)
    if op == NLL:
        return _sparse_loop(nll_row_hessian, xb, yb, sb, cw, total_w, ob, gb, hb, scale,
                            ignore, smoothing, lo, hi, strict, e, h)
    return _sparse_loop(sparse_probs_row_hessian, xb, yb, sb, cw, total_w, ob, gb, hb, scale,
                        ignore, smoothing, lo, hi, strict, e, h)


@numba.njit(nogil=True, error_model="numpy")
def _sparse_blocks(first, last, sums, op, x, y, s, cw, total_w, out, grad, hess, scale,  # type: ignore[no-untyped-def]
                   ignore, smoothing, bounds, strict):
    """Blocks ``first`` to ``last``, with one pair of scratch rows for all of them."""
    e, h = scratch_rows(x)
    for blk in range(first, last):
        sums[blk] = _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, hess, scale,
                                  ignore, smoothing, bounds, strict, e, h)


@kernel(lambda F: f8(In(F, 2), In(i8), In(f8), In(f8), Out(F), Out(F, 2), Out(F, 2), f8, i8,
                     f8, i8, In(f8), b1, b1), parallel=True)
def sparse_rows(x, y, s, cw, out, grad, hess, scale, ignore, smoothing, op, bounds,  # type: ignore[no-untyped-def]
                strict, parallel):
    """``rows.sparse_rows`` that also writes the Hessian to ``hess``."""
    total_w = class_weight_total(cw, x.shape[1])
    nb = row_block_count(x)
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _sparse_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, y, s, cw,
                           total_w, out, grad, hess, scale, ignore, smoothing, bounds, strict)
    else:
        _sparse_blocks(0, nb, sums, op, x, y, s, cw, total_w, out, grad, hess, scale, ignore,
                       smoothing, bounds, strict)
    return _combine(sums, 0.0)  # one unary call: the sum starts at 0
