"""Generic kernels that run a per-row loss over a batch of rows: against rows of targets
(``dense_rows``) or against class indices (``sparse_rows``).

They cut the batch as ``drivers`` does, in blocks of ``BLOCK // C`` rows (at least one),
run serially or in parallel tasks with the same bits, and add the blocks' float64 sums in
block order from ``start``. A row function writes the row's gradient and returns its loss;
``e`` and ``h`` are two scratch rows per task (see ``classification``).
"""

from __future__ import annotations

import numba
import numpy as np

from ._numerics import BLOCK, In, Out, b1, f8, i8, kernel, vector_poison
from .classification import (
    SPARSE_LOGITS,
    SPARSE_PROBS,
    cce_logits_row,
    cce_probs_row,
    sparse_logits_row,
    sparse_probs_row,
)
from .divergence import kl_log_row, kl_probs_row
from .drivers import _combine, _tasks, loop
from .focal import softmax_focal_row
from .multiclass import (
    categorical_hinge_row,
    cosine_similarity_row,
    multiclass_hinge_row,
    nll_row,
)

# Dense row ops: ``a`` is the label smoothing where the loss has it (gamma for focal).
CCE_LOGITS, CCE_PROBS, KL_PROBS, KL_LOG = range(4)
CATEGORICAL_HINGE, COSINE_SIMILARITY, SOFTMAX_FOCAL = range(4, 7)
# Rows against class indices: SPARSE_LOGITS, SPARSE_PROBS (classification.py), then these.
NLL, MULTICLASS_HINGE = range(2, 4)


@numba.njit(nogil=True)
def scratch_rows(x):  # type: ignore[no-untyped-def]
    """The two scratch rows of a run of row blocks: ``e`` in the rows' type, ``h`` float64
    (see ``classification``)."""
    return np.empty(x.shape[1], dtype=x.dtype), np.empty(x.shape[1])


@loop
def row_span(blk, x):  # type: ignore[no-untyped-def]
    """Rows ``lo:hi`` of row block ``blk``: ``BLOCK // C`` rows a block, at least one."""
    per = max(1, BLOCK // x.shape[1])
    lo = blk * per
    return lo, min(lo + per, x.shape[0])


@loop
def row_block_count(x):  # type: ignore[no-untyped-def]
    """How many row blocks the rows of ``x`` make."""
    per = max(1, BLOCK // x.shape[1])
    return (x.shape[0] + per - 1) // per


@loop
def class_weight_total(cw, c):  # type: ignore[no-untyped-def]
    """The sum of the class weights ``cw``; C when there are none (all 1)."""
    if cw.size == 0:
        return float(c)
    total = 0.0
    for k in range(cw.size):
        total += cw[k]
    return total


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
    lo, hi = row_span(blk, x)
    xb, tb = x[lo:hi], t[lo:hi]
    wb = w[lo:hi] if w.size else w
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if strict and want_grad:  # the usual call, its flags as constants (see _sparse_block)
        return _dense_ops(op, xb, tb, wb, ob, gb, scale, a, True, True, e, h)
    return _dense_ops(op, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h)


@loop
def _dense_ops(op, xb, tb, wb, ob, gb, scale, a, strict, want_grad, e, h):  # type: ignore[no-untyped-def]
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
    nb = row_block_count(x)
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
    has_s = s.size > 0
    want_out = out.size > 0
    acc = 0.0
    for i in range(x.shape[0]):
        yi = y[i]
        gi = grad[i] if want_grad else e
        if yi == ignore:
            if strict:  # an ignored row still has to hold valid numbers
                acc += vector_poison(x[i])
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
    lo, hi = row_span(blk, x)
    xb, yb = x[lo:hi], y[lo:hi]
    sb = s[lo:hi] if s.size else s
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if strict and want_grad and smoothing == 0.0:
        # The usual call, its flags as constants: LLVM then drops their checks from the
        # rows' loops, which short rows pay for (softmax CE 256x10: 124 -> 78 ns a row).
        return _sparse_ops(op, xb, yb, sb, cw, total_w, ob, gb, scale, ignore, 0.0, True,
                           True, e, h)
    return _sparse_ops(op, xb, yb, sb, cw, total_w, ob, gb, scale, ignore, smoothing, strict,
                       want_grad, e, h)


@loop
def _sparse_ops(op, xb, yb, sb, cw, total_w, ob, gb, scale, ignore, smoothing, strict,  # type: ignore[no-untyped-def]
                want_grad, e, h):
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
    total_w = class_weight_total(cw, x.shape[1])
    nb = row_block_count(x)
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
