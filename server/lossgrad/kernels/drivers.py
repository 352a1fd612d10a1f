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
)
from .classification import (
    SPARSE_LOGITS,
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
from .regression import huber, mae, mse, pseudo_huber

# Element ops: (a, b) are the loss's scalar parameters.
MAE, MSE, HUBER, PSEUDO_HUBER, HINGE, SQUARED_HINGE, BCE, BCE_LOGITS = range(8)
# Dense row ops: ``a`` is the label smoothing where the loss has it.
CCE_LOGITS, CCE_PROBS, KL_PROBS, KL_LOG = range(4)



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


# --- elementwise ---------------------------------------------------------------------

@loop
def _element_loop(elem, x, y, w, lb, out, grad, scale, a, b, strict):  # type: ignore[no-untyped-def]
    """One block. The main loop has no branches, so it vectorises: it writes the losses
    to ``lb`` and scale * d loss / d x to ``grad`` (a scratch block when the gradient is
    not wanted); weights and per-position outputs are applied on the cached block after.
    ``strict`` poisons the loss where an input is NaN/Inf (off when the request allows
    them: the result is then whatever the arithmetic gives)."""
    sc = fconst(x, scale)
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


@numba.njit(nogil=True, error_model="numpy")
def _element_block(blk, op, x, y, w, out, grad, scale, a, b, strict):  # type: ignore[no-untyped-def]
    lo = blk * BLOCK
    hi = min(lo + BLOCK, x.size)
    xb, yb = x[lo:hi], y[lo:hi]
    wb = w[lo:hi] if w.size else w
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if grad.size else np.empty(hi - lo, dtype=x.dtype)
    lb = np.empty(hi - lo, dtype=x.dtype)
    fa, fb = fconst(x, a), fconst(x, b)
    if op == MAE:
        _element_loop(mae, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == MSE:
        _element_loop(mse, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == HUBER:
        _element_loop(huber, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == PSEUDO_HUBER:
        _element_loop(pseudo_huber, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == HINGE:
        _element_loop(hinge, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == SQUARED_HINGE:
        _element_loop(squared_hinge, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    elif op == BCE:
        _element_loop(bce, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    else:
        _element_loop(bce_logits, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    return block_sum(lb)


@kernel(lambda F: f8(In(F), In(F), In(f8), Out(F), Out(F), f8, i8, f8, f8, b1, b1, f8),
        parallel=True)
def elementwise(x, y, w, out, grad, scale, op, a, b, strict, parallel, start):  # type: ignore[no-untyped-def]
    nb = (x.size + BLOCK - 1) // BLOCK
    sums = np.empty(nb)
    if parallel:
        for blk in numba.prange(nb):
            sums[blk] = _element_block(blk, op, x, y, w, out, grad, scale, a, b, strict)
    else:
        for blk in range(nb):
            sums[blk] = _element_block(blk, op, x, y, w, out, grad, scale, a, b, strict)
    return _combine(sums, start)


# --- rows against rows (dense targets) -------------------------------------------------

@loop
def _dense_loop(row, x, t, w, out, grad, scale, a, strict, want_grad):  # type: ignore[no-untyped-def]
    c = x.shape[1]
    has_w = w.size > 0
    want_out = out.size > 0
    e = np.empty(c, dtype=x.dtype)
    h = np.empty(c)
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
def _dense_block(blk, op, x, t, w, out, grad, scale, a, strict, want_grad):  # type: ignore[no-untyped-def]
    per = max(1, BLOCK // x.shape[1])
    lo = blk * per
    hi = min(lo + per, x.shape[0])
    xb, tb = x[lo:hi], t[lo:hi]
    wb = w[lo:hi] if w.size else w
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if op == CCE_LOGITS:
        return _dense_loop(cce_logits_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad)
    if op == CCE_PROBS:
        return _dense_loop(cce_probs_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad)
    if op == KL_PROBS:
        return _dense_loop(kl_probs_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad)
    return _dense_loop(kl_log_row, xb, tb, wb, ob, gb, scale, a, strict, want_grad)


@kernel(lambda F: f8(In(F, 2), In(F, 2), In(f8), Out(F), Out(F, 2), f8, i8, f8, b1, b1, b1,
                    f8), parallel=True)
def dense_rows(x, t, w, out, grad, scale, op, a, strict, want_grad, parallel, start):  # type: ignore[no-untyped-def]
    """Rows of predictions against rows of targets; ``grad`` is (0, C) when not wanted."""
    per = max(1, BLOCK // x.shape[1])
    nb = (x.shape[0] + per - 1) // per
    sums = np.empty(nb)
    if parallel:
        for blk in numba.prange(nb):
            sums[blk] = _dense_block(blk, op, x, t, w, out, grad, scale, a, strict, want_grad)
    else:
        for blk in range(nb):
            sums[blk] = _dense_block(blk, op, x, t, w, out, grad, scale, a, strict, want_grad)
    return _combine(sums, start)


# --- rows against class indices --------------------------------------------------------

@loop
def _sparse_loop(row, x, y, s, cw, total_w, out, grad, scale, ignore, smoothing,  # type: ignore[no-untyped-def]
                 strict, want_grad):
    c = x.shape[1]
    has_s = s.size > 0
    want_out = out.size > 0
    e = np.empty(c, dtype=x.dtype)
    h = np.empty(c)
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
                  smoothing, strict, want_grad):
    per = max(1, BLOCK // x.shape[1])
    lo = blk * per
    hi = min(lo + per, x.shape[0])
    xb, yb = x[lo:hi], y[lo:hi]
    sb = s[lo:hi] if s.size else s
    ob = out[lo:hi] if out.size else out
    gb = grad[lo:hi] if want_grad else grad
    if op == SPARSE_LOGITS:
        return _sparse_loop(sparse_logits_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                            smoothing, strict, want_grad)
    return _sparse_loop(sparse_probs_row, xb, yb, sb, cw, total_w, ob, gb, scale, ignore,
                        smoothing, strict, want_grad)


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
        for blk in numba.prange(nb):
            sums[blk] = _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, scale, ignore,
                                      smoothing, strict, want_grad)
    else:
        for blk in range(nb):
            sums[blk] = _sparse_block(blk, op, x, y, s, cw, total_w, out, grad, scale, ignore,
                                      smoothing, strict, want_grad)
    return _combine(sums, start)
