"""Generic kernels that run a per-element loss over a whole batch, and what the row
drivers (``rows.py``) and the Hessian drivers (``second_order.py``) share with them.

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
    loop,
    poison,
    sum_add,
)
from .classification import bce, bce_logits
from .focal import sigmoid_focal, sigmoid_focal_squared
from .likelihood import (
    gamma_deviance,
    gaussian_nll,
    poisson_deviance,
    poisson_log,
    poisson_log_plain,
    poisson_rate,
    poisson_rate_plain,
    tweedie,
    tweedie_three_halves,
)
from .margin import hinge, squared_hinge
from .regression import huber, mae, mse, pseudo_huber
from .robust import log_cosh, mape, msle, quantile, smooth_l1

# Element ops: (a, b) are the loss's scalar parameters.
MAE, MSE, HUBER, PSEUDO_HUBER, HINGE, SQUARED_HINGE, BCE, BCE_LOGITS = range(8)
(SMOOTH_L1, LOG_COSH, QUANTILE, MAPE, MSLE, POISSON_LOG, POISSON_RATE, TWEEDIE,
 POISSON_DEVIANCE, GAMMA_DEVIANCE, SIGMOID_FOCAL) = range(8, 19)
# MSE's gradient without its sum (RMSE's second pass, which has the sum from its first):
# unweighted, the driver returns 0 and reads each block once.
MSE_GRADIENT = 19
# Huber (and smooth L1 at beta 1) takes the lean element loop from this many elements on:
# it computes the loss twice, which costs more than it saves while the inputs sit in the
# cores' caches, and less once they come from memory (here: 5% slower at 1e5 and 2.5e5,
# 15% faster at 5e5, 9% at 1e6).
LEAN_HUBER_MIN = 1 << 18


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
def _element_loop(elem, x, y, w, lb, out, grad, scale, a, b, strict, lean=False,  # type: ignore[no-untyped-def]
                  want_grad=True, want_sum=True):
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
    them costs more than it saves; and without the gradient (``want_grad`` off: ``grad``
    is scratch) the second loop is left out, and without the sum (``want_sum`` off) the
    first."""
    sc = fconst(x, scale)
    if lean and not (w.size or out.size):
        s = 0.0
        if want_sum:
            for j in range(x.size):
                s = sum_add(s, elem(x[j], y[j], a, b)[0])
        if want_grad:
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
        return _element_loop(mae, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True,
                             grad.size > 0)
    if op == MSE:
        return _element_loop(mse, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True,
                             grad.size > 0)
    if op == MSE_GRADIENT:
        return _element_loop(mse, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True, True,
                             False)
    if op == HUBER:  # lean only where the inputs come from memory (see LEAN_HUBER_MIN)
        if x.size >= LEAN_HUBER_MIN:
            return _element_loop(huber, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict, True,
                                 grad.size > 0)
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
    if op == POISSON_LOG:  # a: full (the Stirling term)
        if a == 0.0:
            return _element_loop(poisson_log_plain, xb, yb, wb, lb, ob, gb, scale, fa, fb,
                                 strict)
        return _element_loop(poisson_log, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == POISSON_RATE:
        if a == 0.0:
            return _element_loop(poisson_rate_plain, xb, yb, wb, lb, ob, gb, scale, fa, fb,
                                 strict)
        return _element_loop(poisson_rate, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == TWEEDIE:  # a: power
        if a == 1.5:
            return _element_loop(tweedie_three_halves, xb, yb, wb, lb, ob, gb, scale, fa, fb,
                                 strict)
        return _element_loop(tweedie, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == POISSON_DEVIANCE:
        return _element_loop(poisson_deviance, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if op == GAMMA_DEVIANCE:
        return _element_loop(gamma_deviance, xb, yb, wb, lb, ob, gb, scale, fa, fb, strict)
    if b == 2.0:  # b: gamma
        return _element_loop(sigmoid_focal_squared, xb, yb, wb, lb, ob, gb, scale, fa, fb,
                             strict)
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


# --- elementwise with a variance (Gaussian NLL) ---------------------------------------------

@numba.njit(nogil=True, error_model="numpy")
def _gaussian_block(blk, x, y, v, w, out, grad, vgrad, scale, full, strict, losses,  # type: ignore[no-untyped-def]
                    scratch, vscratch):
    """One block of ``gaussian``: like ``_element_loop``, with a third input and a second
    gradient (w.r.t. the variance; ``vscratch`` when not wanted)."""
    xb, yb, wb, ob, gb, lb = block_views(blk, x, y, w, out, grad, losses, scratch)
    lo = blk * BLOCK
    n = xb.size
    vin = v[lo:lo + n]
    vb = vgrad[lo:lo + n] if vgrad.size else vscratch[:n]
    sc = fconst(x, scale)
    for j in range(n):
        xj, yj, vj = xb[j], yb[j], vin[j]
        loss, g, gv = gaussian_nll(xj, yj, vj, full)
        bad = poison(xj) + poison(yj) + poison(vj)
        lb[j] = loss + (bad if strict else fconst(xj, 0.0))
        gb[j] = sc * g
        vb[j] = sc * gv
    if wb.size:
        for j in range(n):
            wj = fconst(x, wb[j])
            lb[j] *= wj
            gb[j] *= wj
            vb[j] *= wj
    if ob.size:
        ob[:] = lb
    return block_sum(lb)


@numba.njit(nogil=True, error_model="numpy")
def _gaussian_blocks(first, last, sums, x, y, v, w, out, grad, vgrad, scale, full, strict):  # type: ignore[no-untyped-def]
    """Blocks ``first`` to ``last``, with one set of scratch blocks for all of them: an
    allocation a block could meet glibc trimming the heap and growing it again, whose
    page faults made the kernel up to 4x slower depending on where the heap ended."""
    losses, scratch = scratch_blocks(x, grad)
    vscratch = np.empty(0 if vgrad.size else losses.size, dtype=x.dtype)
    for blk in range(first, last):
        sums[blk] = _gaussian_block(blk, x, y, v, w, out, grad, vgrad, scale, full, strict,
                                    losses, scratch, vscratch)


@kernel(lambda F: f8(In(F), In(F), In(F), In(f8), Out(F), Out(F), Out(F), f8, b1, b1, b1, f8),
        parallel=True)
def gaussian(x, y, v, w, out, grad, vgrad, scale, full, strict, parallel, start):  # type: ignore[no-untyped-def]
    """Gaussian NLL of predictions x, targets y and variances v (all of one shape);
    ``vgrad`` gets scale * w * d loss / d v (empty: not wanted)."""
    nb = (x.size + BLOCK - 1) // BLOCK
    sums = np.empty(nb)
    if parallel:
        tasks = _tasks(nb)
        for task in numba.prange(tasks):
            _gaussian_blocks(task * nb // tasks, (task + 1) * nb // tasks, sums, x, y, v, w,
                             out, grad, vgrad, scale, full, strict)
    else:
        _gaussian_blocks(0, nb, sums, x, y, v, w, out, grad, vgrad, scale, full, strict)
    return _combine(sums, start)
