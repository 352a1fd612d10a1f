"""The runners: one per catalog loss, from a prepared batch to a Result.

A runner allocates the outputs once (or takes the caller's buffers), calls the loss's
numba driver with the gradient scale of the reduction, checks the total for non-finite
inputs and domain errors, and reduces. Plugin losses register theirs here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import INVALID_LABELS, PARAMETER_OUT_OF_RANGE, InvalidArgumentError
from .kernels import _numerics as nm
from .kernels import drivers, rows, second_order
from .kernels.classification import SPARSE_LOGITS, SPARSE_PROBS
from .kernels.likelihood import GAUSSIAN_EPS
from .kernels.margin import signed_label_mode
from .request import (
    Batch,
    Bound,
    Reduction,
    check_bounds,
    check_nonfinite_total,
    variance_gradient,
)
from .result import Result, new_result

# --- running kernels ---------------------------------------------------------------

# Enum members as module constants (see ``request``): a class attribute lookup each.
_NONE, _SUM, _MEAN = Reduction.NONE, Reduction.SUM, Reduction.MEAN


def _scale(batch: Batch) -> float:
    if batch.reduction is _MEAN:
        return 1.0 / batch.weight_sum if batch.weight_sum > 0 else 0.0
    return 1.0


def _buffers(batch: Batch, want_grad: bool) -> tuple[np.ndarray, np.ndarray]:
    """The outputs, each allocated once (or the caller's): per-position losses (NONE) and
    the gradient."""
    x = batch.x
    if batch.reduction is not _NONE:
        out = np.empty(0, x.dtype)
    elif batch.losses_out is not None:
        out = batch.losses_out
    else:
        out = np.empty(x.shape[0], x.dtype)
    if not want_grad:
        grad = np.empty((0,) + x.shape[1:], x.dtype)
    elif batch.gradient_out is not None:
        grad = batch.gradient_out
    else:
        grad = np.empty(x.shape, x.dtype)
    return out, grad


def _parallel(batch: Batch) -> bool:
    return bool(batch.x.size >= nm.PARALLEL_MIN)


def _narrow(batch: Batch, array: np.ndarray) -> np.ndarray:
    """An output in the predictions' own type: a half type's values are computed in
    float32 and rounded once, here (to nearest, ties to even); a value past the half
    type's range becomes an infinity of its sign, as IEEE rounding has it."""
    if batch.out_dtype is None:
        return array
    with np.errstate(over="ignore"):
        return array.astype(batch.out_dtype)


def _result(batch: Batch, total: float, out: np.ndarray,
            grad: np.ndarray | None, hess: np.ndarray | None = None) -> Result:
    red = batch.reduction
    if red is _NONE:
        loss: float | np.ndarray = _narrow(batch, out.reshape(batch.position_shape))
    elif red is _SUM:
        loss = float(total)
    else:
        loss = float(total) / batch.weight_sum if batch.weight_sum > 0 else 0.0
    shape = batch.shape
    return new_result(
        loss, None if grad is None else _narrow(batch, grad.reshape(shape)),
        math.prod(batch.position_shape), int(batch.counted), float(batch.weight_sum),
        float(total), None if hess is None else _narrow(batch, hess.reshape(shape)))


def _run_elementwise(batch: Batch, want_grad: bool, op: int, a: float = 0.0,
                     b: float = 0.0, x_unit: bool = False, t_unit: bool = False,
                     bounds: tuple[Bound, ...] = ()) -> Result:
    """``bounds``: the domain of the loss's inputs, named when a value outside it made the
    loss non-finite."""
    if batch.hessian is not None:  # the Hessian path: separate kernels
        return run_hessian_kernel(batch, second_order.elementwise, op, a, b, x_unit=x_unit,
                                  t_unit=t_unit, bounds=bounds)
    return run_elementwise_kernel(batch, want_grad, drivers.elementwise, op, a, b,
                                  x_unit=x_unit, t_unit=t_unit, bounds=bounds)


def run_hessian_kernel(batch: Batch, kernel: Any, *args: Any, x_unit: bool = False,
                       t_unit: bool = False, bounds: tuple[Bound, ...] = ()) -> Result:
    """Run an elementwise Hessian driver, ``kernel(x, t, w, out, grad, hess, scale, *args,
    bounds, strict, parallel)``, as :func:`run_elementwise_kernel` runs a gradient one."""
    assert batch.hessian is not None
    out, grad = _buffers(batch, True)
    hess = np.empty_like(grad)
    total = kernel(batch.x, batch.t, batch.w, out, grad, hess, _scale(batch), *args,
                   batch.hessian.bounds, not batch.allow_nonfinite, _parallel(batch))
    check_nonfinite_total(batch, total, x_unit, t_unit)
    check_bounds(batch, total, bounds)
    return _result(batch, total, out, grad, hess)


def run_elementwise_kernel(batch: Batch, want_grad: bool, kernel: Any, *args: Any,
                           x_unit: bool = False, t_unit: bool = False,
                           bounds: tuple[Bound, ...] = ()) -> Result:
    """Run an elementwise driver, ``kernel(x, t, w, out, grad, scale, *args, strict,
    parallel, start)``, with the engine's buffers, gradient scale, checks and reduction; plugin
    losses use it with their own driver."""
    out, grad = _buffers(batch, want_grad)
    total = kernel(batch.x, batch.t, batch.w, out, grad, _scale(batch), *args,
                   not batch.allow_nonfinite, _parallel(batch), batch.start)
    if not math.isfinite(total):
        check_nonfinite_total(batch, total, x_unit, t_unit)
        check_bounds(batch, total, bounds)
    return _result(batch, total, out, grad if want_grad else None)


def register_runner(name: str, run: Callable[[Batch, bool], Result]) -> None:
    """Route the loss ``name`` (registered in the catalog by a plugin) to ``run``."""
    if name in RUNNERS:
        raise ValueError(f"loss {name!r} already has a runner")
    RUNNERS[name] = run


def _run_dense(batch: Batch, want_grad: bool, op: int, a: float,
               x_unit: bool, t_unit: bool = True, factor: float = 1.0) -> Result:
    """Rows against rows; ``factor`` multiplies the loss and the gradient (a loss that is
    linear in a parameter takes it here, not in the kernel)."""
    if batch.hessian is not None:
        out, grad = _buffers(batch, True)
        hess = np.empty_like(grad)
        # The bounds clip factor * h: factor clip(h, lo / factor, hi / factor) for
        # factor > 0; factor 0 (the loss is 0): constant clip(0, lo, hi), the gradient 0.
        bounds, run = batch.hessian.bounds, _scale(batch) * factor
        if factor == 0.0:
            bounds, run = np.full(2, np.clip(0.0, bounds[0], bounds[1])), _scale(batch)
        elif factor != 1.0:
            bounds = bounds / factor
        total = factor * second_order.dense_rows(
            batch.x, batch.t, batch.w, out, grad, hess, run, op, a, bounds,
            not batch.allow_nonfinite, _parallel(batch))
        if factor == 0.0:
            grad *= grad.dtype.type(0.0)
        if factor != 1.0 and out.size:
            out *= out.dtype.type(factor)
        check_nonfinite_total(batch, total, x_unit, t_unit)
        return _result(batch, total, out, grad, hess)
    out, grad = _buffers(batch, want_grad)
    linear = factor != 1.0
    raw = rows.dense_rows(batch.x, batch.t, batch.w, out, grad, _scale(batch) * factor, op,
                             a, not batch.allow_nonfinite, want_grad, _parallel(batch),
                             0.0 if linear else batch.start)
    total = batch.start + factor * raw if linear else raw
    check_nonfinite_total(batch, total, x_unit, t_unit)
    if linear and out.size:
        out *= out.dtype.type(factor)
    return _result(batch, total, out, grad if want_grad else None)


def _elementwise(op: int, *names: str) -> Callable[[Batch, bool], Result]:
    def run(batch: Batch, want_grad: bool) -> Result:
        params = batch.params
        return _run_elementwise(batch, want_grad, op, *[params[n] for n in names])
    return run


def _smooth_l1(batch: Batch, want_grad: bool) -> Result:
    """beta = 1 (the default) is Huber with delta = 1 step for step (0.5 r^2 / 1, |r| - 1/2,
    r / 1, and the same Hessian): its kernel, without smooth L1's two divisions an element."""
    beta = batch.params["beta"]
    if beta == 1.0:
        return _run_elementwise(batch, want_grad, drivers.HUBER, 1.0)
    return _run_elementwise(batch, want_grad, drivers.SMOOTH_L1, beta)


def _rmse(batch: Batch, want_grad: bool) -> Result:
    """sqrt of mse under the same reduction; per position sqrt(w r^2) = sqrt(w) |r|."""
    if batch.reduction is Reduction.NONE:
        batch.w = np.sqrt(batch.w) if batch.w.size else batch.w
        return _run_elementwise(batch, want_grad, drivers.MAE)  # exact Hessian: 0
    out, grad = _buffers(batch, False)
    total = drivers.elementwise(batch.x, batch.t, batch.w, out, grad, 0.0, drivers.MSE, 0.0,
                                0.0, not batch.allow_nonfinite, _parallel(batch), batch.start)
    check_nonfinite_total(batch, total, False, False)
    divisor = batch.weight_sum if batch.reduction is Reduction.MEAN else 1.0
    rmse = math.sqrt(total / divisor) if divisor > 0 else 0.0
    hess = None
    if want_grad:
        out, grad = _buffers(batch, True)
        scale = 1.0 / (2.0 * rmse * divisor) if rmse > 0 else 0.0
        drivers.elementwise(batch.x, batch.t, batch.w, out, grad, scale, drivers.MSE_GRADIENT,
                            0.0, 0.0, not batch.allow_nonfinite, _parallel(batch), 0.0)
        if batch.hessian is not None:  # exact only (catalog): w / (D R) - g^2 / R
            hess = _rmse_hessian(batch, grad, rmse, divisor)
    return Result(rmse, _narrow(batch, grad.reshape(batch.shape)) if want_grad else None,
                  math.prod(batch.position_shape), batch.counted, batch.weight_sum, total,
                  None if hess is None else _narrow(batch, hess.reshape(batch.shape)))


def _rmse_hessian(batch: Batch, grad: np.ndarray, rmse: float, divisor: float) -> np.ndarray:
    """The diagonal of the Hessian of R = sqrt(sum w r^2 / D): w_i / (D R) - g_i^2 / R,
    g the gradient (a dense matrix: only its diagonal is returned); 0 where R = 0."""
    if rmse <= 0:
        return np.zeros_like(grad)
    g = grad.astype(np.float64)
    w = batch.w if batch.w.size else 1.0
    return (w / (divisor * rmse) - g * g / rmse).astype(grad.dtype)


def _hinge(op: int) -> Callable[[Batch, bool], Result]:
    def run(batch: Batch, want_grad: bool) -> Result:
        mode, bad = signed_label_mode(batch.t)
        if mode < 0:
            raise InvalidArgumentError(
                f"targets.data[{bad}]",
                f"{batch.t[bad]!r}: hinge targets must be all in {{-1, 1}} or all in {{0, 1}}",
                INVALID_LABELS)
        return _run_elementwise(batch, want_grad, op, float(mode))
    return run


def _bce(batch: Batch, want_grad: bool) -> Result:
    p = batch.params
    logits = p["from_logits"]
    pos_weight = 1.0 if p["pos_weight"] is None else p["pos_weight"]
    return _run_elementwise(batch, want_grad, drivers.BCE_LOGITS if logits else drivers.BCE,
                            pos_weight, p["label_smoothing"], x_unit=not logits, t_unit=True)


def _cce(batch: Batch, want_grad: bool) -> Result:
    p = batch.params
    logits = p["from_logits"]
    return _run_dense(batch, want_grad, rows.CCE_LOGITS if logits else rows.CCE_PROBS,
                      p["label_smoothing"], x_unit=not logits)


def _kl(batch: Batch, want_grad: bool) -> Result:
    log = batch.params["log_predictions"]
    return _run_dense(batch, want_grad, rows.KL_LOG if log else rows.KL_PROBS, 0.0,
                      x_unit=not log)


def _sparse(batch: Batch, want_grad: bool) -> Result:
    logits = batch.params["from_logits"]
    return _run_sparse(batch, want_grad, SPARSE_LOGITS if logits else SPARSE_PROBS,
                       not logits)


def _run_sparse(batch: Batch, want_grad: bool, op: int, x_unit: bool) -> Result:
    p = batch.params
    smoothing = p.get("label_smoothing", 0.0)
    if batch.hessian is not None:
        out, grad = _buffers(batch, True)
        hess = np.empty_like(grad)
        total = second_order.sparse_rows(
            batch.x, batch.t, batch.w, p["class_weight"], out, grad, hess, _scale(batch),
            p["ignore_index"], smoothing, op, batch.hessian.bounds,
            not batch.allow_nonfinite, _parallel(batch))
        check_nonfinite_total(batch, total, x_unit, False)
        return _result(batch, total, out, grad, hess)
    out, grad = _buffers(batch, want_grad)
    total = rows.sparse_rows(
        batch.x, batch.t, batch.w, p["class_weight"], out, grad, _scale(batch),
        p["ignore_index"], smoothing, op,
        not batch.allow_nonfinite, want_grad, _parallel(batch), batch.start)
    check_nonfinite_total(batch, total, x_unit, False)
    return _result(batch, total, out, grad if want_grad else None)


def _sparse_op(op: int) -> Callable[[Batch, bool], Result]:
    def run(batch: Batch, want_grad: bool) -> Result:
        return _run_sparse(batch, want_grad, op, False)
    return run


def _dense_op(op: int) -> Callable[[Batch, bool], Result]:
    def run(batch: Batch, want_grad: bool) -> Result:
        return _run_dense(batch, want_grad, op, 0.0, x_unit=False, t_unit=False)
    return run


_POSITIVE_PREDICTIONS = Bound("predictions", 0.0, False, "means must be > 0")


def _poisson_nll(batch: Batch, want_grad: bool) -> Result:
    p = batch.params
    if p["log_input"]:
        return _run_elementwise(batch, want_grad, drivers.POISSON_LOG, float(p["full"]))
    return _run_elementwise(batch, want_grad, drivers.POISSON_RATE, float(p["full"]),
                            bounds=(Bound("predictions", 0.0, True, "rates must be >= 0"),))


def _tweedie(batch: Batch, want_grad: bool) -> Result:
    power = batch.params["power"]
    if 0.0 < power < 1.0:
        raise InvalidArgumentError(
            "params.power", f"{power!r} is inside (0, 1), where no Tweedie distribution "
            "exists; use power <= 0 or power >= 1", PARAMETER_OUT_OF_RANGE)
    if power == 0.0:
        return _run_elementwise(batch, want_grad, drivers.MSE)
    if power < 0.0:
        return _run_elementwise(batch, want_grad, drivers.TWEEDIE, power,
                                bounds=(_POSITIVE_PREDICTIONS,))
    targets = (Bound("targets", 0.0, True, "targets must be >= 0 for 1 <= power < 2")
               if power < 2.0 else
               Bound("targets", 0.0, False, "targets must be > 0 for power >= 2"))
    op = {1.0: drivers.POISSON_DEVIANCE, 2.0: drivers.GAMMA_DEVIANCE}.get(power, drivers.TWEEDIE)
    return _run_elementwise(batch, want_grad, op, power,
                            bounds=(_POSITIVE_PREDICTIONS, targets))


def _sigmoid_focal(batch: Batch, want_grad: bool) -> Result:
    p = batch.params
    return _run_elementwise(batch, want_grad, drivers.SIGMOID_FOCAL, p["alpha"], p["gamma"],
                            t_unit=True)


def _softmax_focal(batch: Batch, want_grad: bool) -> Result:
    p = batch.params
    return _run_dense(batch, want_grad, rows.SOFTMAX_FOCAL, p["gamma"], x_unit=False,
                      factor=p["alpha"])


def _gaussian_nll(batch: Batch, want_grad: bool) -> Result:
    out, grad = _buffers(batch, want_grad)
    vgrad = np.empty(batch.x.size if want_grad else 0, batch.x.dtype)
    total = drivers.gaussian(batch.x, batch.t, batch.v, batch.w, out, grad, vgrad,
                             _scale(batch), batch.params["full"], not batch.allow_nonfinite,
                             _parallel(batch), batch.start)
    check_nonfinite_total(batch, total, False, False)
    check_bounds(batch, total, (Bound("variance", 0.0, True, "variances must be >= 0"),))
    hess = None if batch.hessian is None else _gaussian_hessian(batch)
    result = _result(batch, total, out, grad if want_grad else None, hess)
    if not want_grad:
        return result
    return dataclasses.replace(result,
                               variance_gradient=_narrow(batch, variance_gradient(batch, vgrad)))


def _gaussian_hessian(batch: Batch) -> np.ndarray:
    """scale * w * clip(1 / max(v, 1e-6)): the gradient (x - y) / v is linear in the
    mean, so its Hessian needs no pass of its own over x; computed in float64, written
    once in the predictions' dtype."""
    assert batch.hessian is not None
    lo, hi = batch.hessian.bounds
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.clip(1.0 / np.maximum(batch.v.astype(np.float64), GAUSSIAN_EPS), lo, hi)
    h *= _scale(batch)
    if batch.w.size:
        h *= batch.w
    return h.astype(batch.x.dtype)


RUNNERS: dict[str, Callable[[Batch, bool], Result]] = {
    "mae": _elementwise(drivers.MAE),
    "mse": _elementwise(drivers.MSE),
    "rmse": _rmse,
    "huber": _elementwise(drivers.HUBER, "delta"),
    "pseudo_huber": _elementwise(drivers.PSEUDO_HUBER, "delta"),
    "hinge": _hinge(drivers.HINGE),
    "squared_hinge": _hinge(drivers.SQUARED_HINGE),
    "binary_cross_entropy": _bce,
    "categorical_cross_entropy": _cce,
    "sparse_categorical_cross_entropy": _sparse,
    "kl_divergence": _kl,
    "smooth_l1": _smooth_l1,
    "log_cosh": _elementwise(drivers.LOG_COSH),
    "quantile": _elementwise(drivers.QUANTILE, "quantile"),
    "mape": _elementwise(drivers.MAPE),
    "msle": _elementwise(drivers.MSLE),
    "poisson_nll": _poisson_nll,
    "tweedie": _tweedie,
    "gaussian_nll": _gaussian_nll,
    "sigmoid_focal": _sigmoid_focal,
    "softmax_focal": _softmax_focal,
    "nll": _sparse_op(rows.NLL),
    "multiclass_hinge": _sparse_op(rows.MULTICLASS_HINGE),
    "categorical_hinge": _dense_op(rows.CATEGORICAL_HINGE),
    "cosine_similarity": _dense_op(rows.COSINE_SIMILARITY),
}
