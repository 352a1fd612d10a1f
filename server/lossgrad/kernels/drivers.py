"""Generic kernels that run a per-element or per-row loss over a whole batch.

A driver cuts the batch into fixed blocks (``BLOCK`` elements, or ``BLOCK // C`` rows),
runs them in parallel above ``PARALLEL_MIN`` elements and serially below, and adds the
blocks' float64 sums in block order: the same inputs give the same bits for any thread
count. Blocks are aligned to the start of the arrays, and the sum continues from
``start``: a batch cut at block boundaries into consecutive calls, each given the total
of the calls before, gives the bits of one call over the whole batch (what a
ComputeStream relies on). Per block it applies the per-position weights ``w`` (empty:
all 1), writes the weighted per-position losses to ``out`` (empty: not wanted) and
``scale * w * d loss / d x`` to ``grad``. Drivers return the sum of w * loss: NaN or Inf
when an input is invalid (see ``_numerics.poison``), and only then does the engine look
for the offending value.
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
    f8,
    fconst,
    i8,
    kernel,
    poison,
    sum_add,
)
from .classification import (
    SPARSE_LOGITS,
    SPARSE_PROBS,
    bce,
    bce_logits,
    cce_logits_row,
    cce_probs_row,
    hinge,
    sparse_logits_row,
    sparse_probs_row,
    squared_hinge,
)
from .divergence import kl_log_row, kl_probs_row
from .focal import sigmoid_focal, softmax_focal_row
from .likelihood import (
    gamma_deviance,
    gaussian_nll,
    poisson_deviance,
    poisson_log,
    poisson_rate,
    tweedie,
)
from .multiclass import (
    categorical_hinge_row,
    cosine_similarity_row,
    multiclass_hinge_row,
    nll_row,
)
from .regression import huber, mae, mse, pseudo_huber
from .robust import log_cosh, mape, msle, quantile, smooth_l1

# Element ops: (a, b) are the loss's scalar parameters.
MAE, MSE, HUBER, PSEUDO_HUBER, HINGE, SQUARED_HINGE, BCE, BCE_LOGITS = range(8)
(SMOOTH_L1, LOG_COSH, QUANTILE, MAPE, MSLE, POISSON_LOG, POISSON_RATE, TWEEDIE,
 POISSON_DEVIANCE, GAMMA_DEVIANCE, SIGMOID_FOCAL) = range(8, 19)
# Dense row ops: ``a`` is the label smoothing where the loss has it (gamma for focal).
CCE_LOGITS, CCE_PROBS, KL_PROBS, KL_LOG = range(4)
CATEGORICAL_HINGE, COSINE_SIMILARITY, SOFTMAX_FOCAL = range(4, 7)
# Rows against class indices: SPARSE_LOGITS, SPARSE_PROBS (classification.py), then these.
NLL, MULTICLASS_HINGE = range(2, 4)



def loop(fn):  # type: ignore[no-untyped-def]
    """A loop generic over the loss function it is given. Inlined into its caller while
    numba types the code, so the loss function is a compile-time constant: the loop is
    specialised per loss (and vectorised), and the driver stays cacheable."""
    return numba.njit(inline="always", error_model="numpy")(fn)


@numba.njit(nogil=True)
def _combine(sums, start):  # type: ignore[no-untyped-def]
    """Add the blocks' sums to ``start`` in block order (fixed, whatever ran them)."""
    total = start
    for blk in range(sums.size):
        total += sums[blk]
    return total


TASKS = 64  # parallel tasks at most: numba splits a prange evenly between its threads


@numba.njit(nogil=True)
def _tasks(blocks):  # type: ignore[no-untyped-def]
    """Parallel tasks for ``blocks`` blocks, each a run of consecutive blocks that
    allocates its scratch once. Each block's sum is kept apart, so the bits do not depend
    on the split."""
    return max(1, min(blocks, TASKS))


@numba.njit(nogil=True)
def scratch_blocks(x, grad):  # type: ignore[no-untyped-def]
    """A block for the losses and, when the gradient is not wanted (``grad`` empty), one
    for it: the scratch of a run of element blocks."""
    size = min(BLOCK, x.size)
    return np.empty(size, dtype=x.dtype), np.empty(0 if grad.size else size, dtype=x.dtype)


@numba.njit(nogil=True)
def scratch_rows(x):  # type: ignore[no-untyped-def]
    """The two scratch rows of a run of row blocks: ``e`` in the rows' type, ``h`` float64
    (see ``classification``)."""
    return np.empty(x.shape[1], dtype=x.dtype), np.empty(x.shape[1])


# --- elementwise ---------------------------------------------------------------------

@loop
def block_views(blk, x, y, w, out, grad, losses, scratch):  # type: ignore[no-untyped-def]
    """Element block ``blk`` of the inputs and outputs, and its part of the scratch blocks:
    (x, y, w, out, grad, losses). ``w`` and ``out`` stay empty when they are; ``grad`` is
    ``scratch`` when the gradient is not wanted (empty)."""
    lo = blk * BLOCK
    hi = min(lo + BLOCK, x.size)
    wb = w[lo:hi] if w.size else w
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if grad.size else scratch[:hi - lo]
    return x[lo:hi], y[lo:hi], wb, ob, gb, losses[:hi - lo]


@loop
def _element_loop(elem, x, y, w, lb, out, grad, scale, a, b, strict, lean=False):  # type: ignore[no-untyped-def]
    """One block; returns the sum of its weighted losses. The main loop has no branches,
    so it vectorises: it writes the losses to ``lb`` and scale * d loss / d x to ``grad``
    (a scratch block when the gradient is not wanted); weights and per-position outputs
    are applied on the cached block after. ``strict`` poisons the loss where an input is
    NaN/Inf (off when the request allows them: the result is then whatever the arithmetic
    gives).

    ``lean`` (a constant) is for light losses of r = x - y whose loss is NaN or Inf
    whenever an input is: without weights or per-position outputs, a loop that only sums
    the losses then replaces the losses block and the poison terms, and a second one
    writes the gradient (the block is in L1 for both). The sum's loop must not store: a
    loop that stores runs its vector or its scalar version depending on where the output
    lies, and the two add in different orders. Heavier losses keep the block: recomputing
    them costs more than it saves."""
    sc = fconst(x, scale)
    if lean and not (w.size or out.size):
        s = 0.0
        for j in range(x.size):
            s = sum_add(s, elem(x[j], y[j], a, b)[0])
        for j in range(x.size):
            grad[j] = sc * elem(x[j], y[j], a, b)[1]
        return s
    for j in range(x.size):
        xj = x[j]
        yj = y[j]
        loss, g = elem(xj, yj, a, b)
        bad = poison(xj) + poison(yj)
        lb[j] = loss + (bad if strict else fconst(xj, 0.0))
        grad[j] = sc * g
    if w.size:
        for j in range(x.size):
            lb[j] *= fconst(x, w[j])
            grad[j] *= fconst(x, w[j])
    if out.size:
        for j in range(x.size):
            out[j] = lb[j]
    return block_sum(lb)


@numba.njit(nogil=True, error_model="numpy")
def _element_block(blk, op, x, y, w, out, grad, scale, a, b, strict, losses, scratch):  # type: ignore[no-untyped-def]
    """One block; ``losses`` and ``scratch`` (the gradient when it is not wanted) are
    scratch blocks."""
    xb, yb, wb, ob, gb, lb = block_views(blk, x, y, w, out, grad, losses, scratch)
    fa, fb = fconst(x, a), fconst(x, b)
    if op == MAE:
        return _element_loop(mae, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True)
    if op == MSE:
        return _element_loop(mse, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True)
    if op == HUBER:
        return _element_loop(huber, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == PSEUDO_HUBER:
        return _element_loop(pseudo_huber, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == HINGE:
        return _element_loop(hinge, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == SQUARED_HINGE:
        return _element_loop(squared_hinge, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == BCE:
        return _element_loop(bce, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == BCE_LOGITS:
        return _element_loop(bce_logits, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == SMOOTH_L1:
        return _element_loop(smooth_l1, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == LOG_COSH:
        return _element_loop(log_cosh, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == QUANTILE:
        return _element_loop(quantile, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == MAPE:
        return _element_loop(mape, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == MSLE:
        return _element_loop(msle, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == POISSON_LOG:
        return _element_loop(poisson_log, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == POISSON_RATE:
        return _element_loop(poisson_rate, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == TWEEDIE:
        return _element_loop(tweedie, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == POISSON_DEVIANCE:
        return _element_loop(poisson_deviance, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == GAMMA_DEVIANCE:
        return _element_loop(gamma_deviance, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    return _element_loop(sigmoid_focal, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)


@numba.njit(nogil=True, error_model="numpy")
def _element_blocks(first, last, sums, op, x, y, w, out, grad, scale, a, b, strict):  # type: ignore[no-untyped-def]
    """Blocks ``first`` to ``last``, with one set of scratch blocks for all of them."""
    losses, scratch = scratch_blocks(x, grad)
    for blk in range(first, last):
        sums[blk] = _element_block(blk, op, x, y, w, out, grad, scale, a, b, strict, losses,
                                   scratch)


@kernel(lambda F: f8(In(F), In(F), In(f8), Out(F), Out(F), f8, i8, f8, f8, b1, b1, f8),
        parallel=True)
def elementwise(x, y, w, out, grad, scale, op, a, b, strict, parallel, start):  # type: ignore[no-untyped-def]
    nb = (x.size + BLOCK - 1) // BLOCK
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _element_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, y, w,
                            out, grad, scale, a, b, strict)
    else:
        _element_blocks(0, nb, sums, op, x, y, w, out, grad, scale, a, b, strict)
    return _combine(sums, start)


# --- rows against rows (dense targets) -------------------------------------------------

@loop
def _dense_loop(row, x, t, w, out, grad, scale, a, strict, want_grad, e, h):  # type: ignore[no-untyped-def]
    """Rows of one block; ``e`` and ``h`` are the scratch rows (see ``classification``)."""
    has_w = w.size > 0
    want_out = out.size > 0
    acc = 0.0
    for i in range(x.shape[0]):
        wi = w[i] if has_w else 1.0
        gi = grad[i] if want_grad else e
        loss = wi * row(x[i], t[i], gi, e, h, scale * wi, a, strict, want_grad)
        acc += loss
        if want_out:
            out[i] = loss
    return acc


@numba.njit(nogil=True, error_model="numpy")
def _dense_block(blk, op, x, t, w, out, grad, scale, a, strict, want_grad, e, h):  # type: ignore[no-untyped-def]
    per = max(1, BLOCK // x.shape[1])
    lo = blk * per
    hi = min(lo + per, x.shape[0])
    xb, tb = x[lo:hi], t[lo:hi]
    wb = w[lo:hi] if w.size else w
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if op == CCE_LOGITS:
        return _dense_loop(cce_logits_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)
    if op == CCE_PROBS:
        return _dense_loop(cce_probs_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)
    if op == KL_PROBS:
        return _dense_loop(kl_probs_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)
    if op == KL_LOG:
        return _dense_loop(kl_log_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)
    if op == CATEGORICAL_HINGE:
        return _dense_loop(categorical_hinge_row, xb, tb, wb, ob, gb, scale, a, strict,
                           want_grad, e, h)
    if op == COSINE_SIMILARITY:
        return _dense_loop(cosine_similarity_row, xb, tb, wb, ob, gb, scale, a, strict,
                           want_grad, e, h)
    return _dense_loop(softmax_focal_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)


@numba.njit(nogil=True, error_model="numpy")
def _dense_blocks(first, last, sums, op, x, t, w, out, grad, scale, a, strict,  # type: ignore[no-untyped-def]
                  want_grad):
    """Blocks ``first`` to ``last``, with one pair of scratch rows for all of them."""
    e, h = scratch_rows(x)
    for blk in range(first, last):
        sums[blk] = _dense_block(blk, op, x, t, w, out, grad, scale, a, strict, want_grad, e, h)


@kernel(lambda F: f8(In(F, 2), In(F, 2), In(f8), Out(F), Out(F, 2), f8, i8, f8, b1, b1, b1,
                    f8), parallel=True)
def dense_rows(x, t, w, out, grad, scale, op, a, strict, want_grad, parallel, start):  # type: ignore[no-untyped-def]
    """Rows of predictions against rows of targets; ``grad`` is (0, C) when not wanted."""
    per = max(1, BLOCK // x.shape[1])
    nb = (x.shape[0] + per - 1) // per
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _dense_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, t, w, out,
                          grad, scale, a, strict, want_grad)
    else:
        _dense_blocks(0, nb, sums, op, x, t, w, out, grad, scale, a, strict, want_grad)
    return _combine(sums, start)


# --- rows against class indices --------------------------------------------------------

@loop
def _sparse_loop(row, x, y, s, cw, total_w, out, grad, scale, ignore, smoothing,  # type: ignore[no-untyped-def]
                 strict, want_grad, e, h):
    c = x.shape[1]
    has_s = s.size > 0
    want_out = out.size > 0
    acc = 0.0
    for i in range(x.shape[0]):
        yi = y[i]
        gi = grad[i] if want_grad else e
        if yi == ignore:
            if strict:
                xi = x[i]
                for k in range(c):  # an ignored row still has to hold valid numbers
                    e[k] = poison(xi[k])
                acc += block_sum(e)
            if want_out:
                out[i] = 0.0
            if want_grad:
                gi[:] = 0.0
            continue
        si = s[i] if has_s else 1.0
        loss = si * row(x[i], yi, cw, total_w, gi, e, h, scale * si, smoothing, strict,
                        want_grad)
        acc += loss
        if want_out:
            out[i] = loss
    return acc


@numba.njit(nogil=True, error_model="numpy")
def _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, scale, ignore,  # type: ignore[no-untyped-def]
                  smoothing, strict, want_grad, e, h):
    per = max(1, BLOCK // x.shape[1])
    lo = blk * per
    hi = min(lo + per, x.shape[0])
    xb, yb = x[lo:hi], y[lo:hi]
    sb = s[lo:hi] if s.size else s
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if op == SPARSE_LOGITS:
        return _sparse_loop(sparse_logits_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                            smoothing, strict, want_grad, e, h)
    if op == SPARSE_PROBS:
        return _sparse_loop(sparse_probs_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                            smoothing, strict, want_grad, e, h)
    if op == NLL:
        return _sparse_loop(nll_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                            smoothing, strict, want_grad, e, h)
    return _sparse_loop(multiclass_hinge_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                        smoothing, strict, want_grad, e, h)


@numba.njit(nogil=True, error_model="numpy")
def _sparse_blocks(first, last, sums, op, x, y, s, cw, total_w, out, grad, scale,  # type: ignore[no-untyped-def]
                   ignore, smoothing, strict, want_grad):
    """Blocks ``first`` to ``last``, with one pair of scratch rows for all of them."""
    e, h = scratch_rows(x)
    for blk in range(first, last):
        sums[blk] = _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, scale, ignore,
                                  smoothing, strict, want_grad, e, h)


@kernel(lambda F: f8(In(F, 2), In(i8), In(f8), In(f8), Out(F), Out(F, 2), f8, i8, f8, i8,
                    b1, b1, b1, f8), parallel=True)
def sparse_rows(x, y, s, cw, out, grad, scale, ignore, smoothing, op, strict,  # type: ignore[no-untyped-def]
                want_grad, parallel, start):
    """Cross-entropy against class indices (see ``classification.sparse_*_row``). Rows whose
    target is ``ignore`` contribute 0; ``s`` holds per-row sample weights."""
    total_w = 0.0
    for k in range(cw.size):
        total_w += cw[k]
    if cw.size == 0:
        total_w = float(x.shape[1])
    per = max(1, BLOCK // x.shape[1])
    nb = (x.shape[0] + per - 1) // per
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _sparse_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, op, x, y, s, cw,
                           total_w, out, grad, scale, ignore, smoothing, strict, want_grad)
    else:
        _sparse_blocks(0, nb, sums, op, x, y, s, cw, total_w, out, grad, scale, ignore,
                       smoothing, strict, want_grad)
    return _combine(sums, start)


# --- elementwise with a variance (Gaussian NLL) ---------------------------------------------

@numba.njit(nogil=True, error_model="numpy")
def _gaussian_block(blk, x, y, v, w, out, grad, vgrad, scale, full, strict):  # type: ignore[no-untyped-def]
    """One block of ``gaussian``: like ``_element_loop``, with a third input and a second
    gradient (w.r.t. the variance; a scratch block when not wanted)."""
    lo = blk * BLOCK
    hi = min(lo + BLOCK, x.size)
    n = hi - lo
    gb = grad[lo:hi] if grad.size else np.empty(n, dtype=x.dtype)
    vb = vgrad[lo:hi] if vgrad.size else np.empty(n, dtype=x.dtype)
    lb = np.empty(n, dtype=x.dtype)
    sc = fconst(x, scale)
    for j in range(n):
        xj, yj, vj = x[lo + j], y[lo + j], v[lo + j]
        loss, g, gv = gaussian_nll(xj, yj, vj, full)
        bad = poison(xj) + poison(yj) + poison(vj)
        lb[j] = loss + (bad if strict else fconst(xj, 0.0))
        gb[j] = sc * g
        vb[j] = sc * gv
    if w.size:
        for j in range(n):
            wj = fconst(x, w[lo + j])
            lb[j] *= wj
            gb[j] *= wj
            vb[j] *= wj
    if out.size:
        out[lo:hi] = lb
    return block_sum(lb)


@kernel(lambda F: f8(In(F), In(F), In(F), In(f8), Out(F), Out(F), Out(F), f8, b1, b1, b1, f8),
        parallel=True)
def gaussian(x, y, v, w, out, grad, vgrad, scale, full, strict, parallel, start):  # type: ignore[no-untyped-def]
    """Gaussian NLL of predictions x, targets y and variances v (all of one shape);
    ``vgrad`` gets scale * w * d loss / d v (empty: not wanted)."""
    nb = (x.size + BLOCK - 1) // BLOCK
    sums = np.empty(nb)
    if parallel:
        for blk in numba.prange(nb):
            sums[blk] = _gaussian_block(blk, x, y, v, w, out, grad, vgrad, scale, full, strict)
    else:
        for blk in range(nb):
            sums[blk] = _gaussian_block(blk, x, y, v, w, out, grad, vgrad, scale, full, strict)
    return _combine(sums, start)
