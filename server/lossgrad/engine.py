"""The in-process engine: validate the request, call the kernel, reduce.

``compute`` is the one code path; the gRPC servicer only converts messages and calls it.
It prepares the batch (:mod:`lossgrad.request`) and hands it to the loss's runner
(:mod:`lossgrad.runners`). The kernel reads each input once and writes the gradient once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import catalog, plugin
from .catalog import HessianMode, Layout, LossSpec
from .errors import SHARED_MEMORY_MISALIGNED, SHARED_MEMORY_OUT_OF_RANGE, InvalidArgumentError
from .kernels import _numerics as nm
from .params import hessian_request
from .request import FLOAT_DTYPES, Batch, Reduction, prepare
from .result import Result
from .runners import RUNNERS, register_runner, run_elementwise_kernel, run_hessian_kernel

__all__ = ["HessianMode", "Reduction", "Result", "compute", "register_runner", "run",
           "run_elementwise_kernel", "run_hessian_kernel", "warmup"]


def compute(
    loss: str,
    predictions: Any,
    targets: Any,
    *,
    reduction: Reduction | str = Reduction.MEAN,
    sample_weight: Any = None,
    gradient: bool = True,
    hessian: HessianMode | str | None = None,
    hessian_floor: float | None = None,
    hessian_constant: float | None = None,
    allow_nonfinite: bool = False,
    gradient_out: np.ndarray | None = None,
    losses_out: np.ndarray | None = None,
    variance: Any = None,
    **params: Any,
) -> Result:
    """Compute a loss (and by default its gradient w.r.t. the predictions).

    ``loss`` is a catalog name or alias; ``params`` are the loss's parameters (see
    ``lossgrad.catalog``). Inputs are anything ``numpy.asarray`` takes. ``hessian``
    ("exact", "clipped" or "constant"; the loss's ``hessian_modes``) also returns the
    diagonal Hessian, with the gradient: ``hessian_floor`` (clipped, default 1e-16) and
    ``hessian_constant`` (constant, default 1) set its bounds. ``variance`` is the third
    input of the losses that take one (gaussian_nll). Raises ``InvalidArgumentError``
    naming the field and the reason for bad input.

    ``gradient_out`` and ``losses_out`` are optional writable byte buffers (1-D uint8,
    aligned for the predictions' dtype; shared memory in the service) that receive the
    gradient and the REDUCTION_NONE per-position losses instead of new arrays: the
    kernel writes there directly, and the result's arrays view their first bytes. Errors
    about them name the request fields ``gradient_output`` and ``losses_output``.
    """
    plugin.ensure_loaded()  # once: the first call loads the installed plugin losses
    nm.compile_kernels()  # once: the first call compiles every kernel
    batch = prepare(loss, predictions, targets, reduction, sample_weight, allow_nonfinite,
                    params, variance)
    batch.hessian = hessian_request(batch.spec, hessian, hessian_floor, hessian_constant)
    if batch.hessian is not None and not gradient:
        raise InvalidArgumentError("hessian", "a Hessian comes with the gradient "
                                   "(ComputeGradient), not with the loss alone")
    if losses_out is not None and batch.reduction is not Reduction.NONE:
        raise InvalidArgumentError("losses_output",
                                   "per-position losses exist only with REDUCTION_NONE")
    if not gradient:
        gradient_out = None
    if batch.out_dtype is not None and (gradient_out is not None or losses_out is not None):
        # half types: computed in float32 and rounded once afterwards, then copied
        return _copied_out(RUNNERS[batch.spec.name](batch, gradient), gradient_out,
                           losses_out)
    if gradient_out is not None:
        batch.gradient_out = _output(gradient_out, batch.x, "gradient_output")
    if losses_out is not None:
        batch.losses_out = _output(losses_out, np.empty(batch.x.shape[0], batch.x.dtype),
                                   "losses_output")
    return RUNNERS[batch.spec.name](batch, gradient)


def run(batch: Batch, gradient: bool) -> Result:
    """Run a prepared batch (a stream's piece: ``batch.start`` and ``batch.weight_sum``
    set by the stream)."""
    return RUNNERS[batch.spec.name](batch, gradient)


def _copied_out(result: Result, gradient_out: np.ndarray | None,
                losses_out: np.ndarray | None) -> Result:
    """``result`` with its arrays copied into the caller's buffers."""
    gradient, loss = result.gradient, result.loss
    if gradient_out is not None and gradient is not None:
        target = _output(gradient_out, gradient, "gradient_output")
        np.copyto(target, gradient)
        gradient = target
    if losses_out is not None and isinstance(loss, np.ndarray):
        target = _output(losses_out, loss, "losses_output")
        np.copyto(target, loss)
        loss = target
    return dataclasses.replace(result, loss=loss, gradient=gradient)


def _output(buffer: np.ndarray, like: np.ndarray, field: str) -> np.ndarray:
    """The first ``like.nbytes`` of a byte buffer, as an array shaped and typed like ``like``."""
    if buffer.nbytes < like.nbytes:
        raise InvalidArgumentError(
            f"{field}.byte_size", f"{buffer.nbytes} bytes; the output needs {like.nbytes}",
            SHARED_MEMORY_OUT_OF_RANGE)
    out = buffer.reshape(-1).view(np.uint8)[:like.nbytes].view(like.dtype).reshape(like.shape)
    if not (out.flags.writeable and out.flags.c_contiguous and out.flags.aligned):
        raise InvalidArgumentError(
            field, f"not a writable buffer aligned to {like.dtype.itemsize} bytes",
            SHARED_MEMORY_MISALIGNED)
    return out


def warmup() -> None:
    """Run every loss once per dtype so that every kernel is compiled (or loaded from
    the numba cache) and ready before the service reports SERVING."""
    plugin.ensure_loaded()
    for dtype in FLOAT_DTYPES:
        for spec in catalog.all_losses():
            x, t = _warmup_inputs(spec, dtype)
            v = None if spec.variance is None else np.ones_like(x)
            for red in Reduction:
                for grad in (True, False):
                    compute(spec.name, x, t, reduction=red, gradient=grad, variance=v)
            if HessianMode.EXACT in spec.hessian_modes:
                compute(spec.name, x, t, hessian=HessianMode.EXACT, variance=v)


def _warmup_inputs(spec: LossSpec, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    if spec.layout is Layout.ELEMENTWISE:
        x = np.array([0.25, 0.75], dtype=dtype)
        t = np.array([1.0, 0.0], dtype=dtype)
        if spec.targets.kind is catalog.InputKind.SIGNED_LABELS:
            t = np.array([1.0, -1.0], dtype=dtype)
        return x, t
    x = np.full((2, 2), 0.5, dtype=dtype)
    if spec.layout is Layout.SPARSE_ROWS:
        return x, np.array([0, 1], dtype=np.int64)
    return x, np.full((2, 2), 0.5, dtype=dtype)
