"""Validation: a request's loss, parameters and tensors, turned into the flat views the
kernels take (``Batch``), or an ``InvalidArgumentError`` naming the field and the reason.
The parameters, the reduction and the Hessian fields are checked in :mod:`lossgrad.params`.

Inputs are viewed, never copied when already float32/float64 in C order. Value checks
that need a pass over the data (NaN/Inf, probabilities in [0, 1]) are not made here:
the kernels poison their sum with NaN on such values, and ``check_nonfinite_total``
looks for the offending value only then.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from . import catalog
from .catalog import Layout, LossSpec
from .errors import (
    EMPTY_BATCH,
    LABEL_OUT_OF_RANGE,
    MISSING_FIELD,
    NONFINITE_INPUT,
    SHAPE_MISMATCH,
    UNEXPECTED_FIELD,
    UNSUPPORTED_DTYPE,
    VALUE_OUT_OF_RANGE,
    InvalidArgumentError,
)
from .kernels import _numerics as nm
from .kernels.classification import label_stats
from .params import HessianRequest, Reduction, reduction_of, resolve_params

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Computed in float32: widened once on the way in (exact), rounded once on the way out.
HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_EMPTY_F8 = np.empty(0, dtype=np.float64)
_NO_IGNORE = np.iinfo(np.int64).min


@dataclass
class Batch:
    """A validated request, in the flat views the kernels take."""

    spec: LossSpec
    params: dict[str, Any]
    reduction: Reduction
    x: np.ndarray  # predictions: 1-D (elementwise) or 2-D (rows)
    t: np.ndarray  # targets: like x, or 1-D int64 class indices
    w: np.ndarray  # per-position float64 weights, or empty
    position_shape: tuple[int, ...]
    weight_sum: float
    counted: int
    allow_nonfinite: bool

    shape: tuple[int, ...]  # the predictions' shape, which the gradient takes
    out_dtype: np.dtype[Any] | None = None  # a half type the outputs go back to, if any
    start: float = 0.0  # the sum of w * loss over the positions before these (a stream's)
    hessian: HessianRequest | None = None  # set by the engine when a Hessian is wanted
    # Caller-provided outputs (shared memory): written instead of new arrays.
    gradient_out: np.ndarray | None = None  # like x
    losses_out: np.ndarray | None = None  # (positions,)
    # gaussian_nll: the variances, flat like x (predictions' dtype), and their shape as sent
    v: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY_F8)
    v_shape: tuple[int, ...] = ()  # the variance's shape as sent


def prepare(loss: str, predictions: Any, targets: Any, reduction: Reduction | str,
            sample_weight: Any, allow_nonfinite: bool, params: dict[str, Any],
            variance: Any = None) -> Batch:
    """Validate a request and return it as a ``Batch``."""
    spec = catalog.lookup(loss)
    values = resolve_params(spec, loss, params)
    return prepare_resolved(spec, values, reduction_of(reduction), predictions, targets,
                            sample_weight, allow_nonfinite, variance)


def prepare_resolved(spec: LossSpec, params: dict[str, Any], red: Reduction, predictions: Any,
                     targets: Any, sample_weight: Any, allow_nonfinite: bool,
                     variance: Any = None) -> Batch:
    """``prepare`` once the loss, its parameters and the reduction are resolved: what a
    stream runs for each of its pieces."""
    x = _predictions(predictions, spec)
    half = x.dtype if x.dtype in HALF_DTYPES else None
    if half is not None:
        x = x.astype(np.float32)  # the kernels' type; float32 holds every half value
    batch = _prepare(spec, params, red, x, targets, sample_weight, allow_nonfinite)
    batch.out_dtype = half
    if spec.variance is not None:
        batch.v, batch.v_shape = _variance(variance, x)
    elif variance is not None:
        raise InvalidArgumentError(
            "variance", f"loss {spec.name!r} takes no variance (only gaussian_nll does)",
            UNEXPECTED_FIELD)
    return batch


# --- tensors -----------------------------------------------------------------------

def _array(value: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(field, f"not an array: {exc}", UNSUPPORTED_DTYPE) from None
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    return arr


def _check_shape_nonempty(arr: np.ndarray, field: str, min_ndim: int) -> None:
    if arr.ndim < min_ndim:
        raise InvalidArgumentError(
            f"{field}.shape", f"needs at least {min_ndim} dimension(s), got shape {arr.shape}",
            SHAPE_MISMATCH)
    for axis, size in enumerate(arr.shape):
        if size == 0:
            raise InvalidArgumentError(
                f"{field}.shape[{axis}]", f"is 0: empty input (shape {arr.shape})", EMPTY_BATCH)


# Enum members as module constants: ``Layout.ELEMENTWISE`` is a metaclass lookup (~50 ns
# in Python 3.11), and a small call makes many.
_ELEMENTWISE, _SPARSE_ROWS = Layout.ELEMENTWISE, Layout.SPARSE_ROWS


def _predictions(value: Any, spec: LossSpec) -> np.ndarray:
    x = _array(value, "predictions")
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES and dtype not in HALF_DTYPES:
        raise InvalidArgumentError(
            "predictions.dtype",
            f"{dtype} is not supported; use float32, float64, float16 or bfloat16",
            UNSUPPORTED_DTYPE)
    _check_shape_nonempty(x, "predictions", 1 if spec.layout is _ELEMENTWISE else 2)
    return x


def _prepare(spec: LossSpec, params: dict[str, Any], red: Reduction, x: np.ndarray,
             targets: Any, sample_weight: Any, allow_nonfinite: bool) -> Batch:
    t = _array(targets, "targets")
    layout = spec.layout
    shape = x.shape
    if layout is _SPARSE_ROWS:
        position_shape = shape[:-1]
        if t.dtype not in _INDEX_DTYPES:
            raise InvalidArgumentError(
                "targets.dtype", f"{t.dtype} is not supported; class indices are int32 or int64",
                UNSUPPORTED_DTYPE)
        _expect_shape(t, position_shape, "targets", "predictions' shape without the class axis")
        t = t.astype(np.int64, copy=False)
    else:
        position_shape = shape if layout is _ELEMENTWISE else shape[:-1]
        _expect_shape(t, shape, "targets", "the predictions' shape")
        if t.dtype != x.dtype:
            if t.dtype.kind not in "fiu" and t.dtype not in HALF_DTYPES:
                raise InvalidArgumentError(
                    "targets.dtype", f"{t.dtype} is not supported; use float32 or float64",
                    UNSUPPORTED_DTYPE)
            t = _convert(t, x.dtype, "targets")  # one conversion to the predictions' type
    w = _EMPTY_F8 if sample_weight is None else _sample_weight(sample_weight, x, position_shape)
    if layout is _ELEMENTWISE:
        x2, t2 = x.reshape(-1), t.reshape(-1)
    else:
        c = shape[-1]
        x2 = x.reshape(-1, c)
        t2 = t.reshape(-1) if layout is _SPARSE_ROWS else t.reshape(-1, c)
    if layout is _SPARSE_ROWS:
        weight_sum, counted = sparse_weights(params, t2, shape[-1], w)
    elif w.size:
        _, total, acc, counted = nm.weight_stats(w, 0, 0.0, 0.0)
        weight_sum = total + acc
    else:
        counted = math.prod(position_shape)
        weight_sum = float(counted)
    return Batch(spec, params, red, x2, t2, w, position_shape, weight_sum, counted,
                 allow_nonfinite, shape)


def _convert(arr: np.ndarray, dtype: np.dtype[Any], field: str) -> np.ndarray:
    """``arr`` in ``dtype``; a finite value too large for it is an error (it would become an
    infinity the caller never sent), found by the cast itself rather than by another pass."""
    try:
        with np.errstate(over="raise"):
            return arr.astype(dtype, copy=False)
    except FloatingPointError:
        with np.errstate(over="ignore"):
            lost = np.isfinite(arr) & ~np.isfinite(arr.astype(dtype))
        index = np.unravel_index(int(np.argmax(lost)), arr.shape)
        raise InvalidArgumentError(
            f"{field}[{', '.join(map(str, index))}]",
            f"{arr[index].item()!r} is outside the range of {dtype} (the predictions' type, which "
            f"{field} are converted to)", VALUE_OUT_OF_RANGE) from None


def _expect_shape(arr: np.ndarray, shape: tuple[int, ...], field: str, what: str) -> None:
    if arr.shape != shape:
        raise InvalidArgumentError(
            f"{field}.shape", f"{arr.shape} must equal {what} {shape}", SHAPE_MISMATCH)


def _sample_weight(value: Any, x: np.ndarray, position_shape: tuple[int, ...]) -> np.ndarray:
    w = _array(value, "sample_weight")
    if w.dtype.kind not in "fiu" and w.dtype not in HALF_DTYPES:
        raise InvalidArgumentError(
            "sample_weight.dtype", f"{w.dtype} is not supported; use float32 or float64",
            UNSUPPORTED_DTYPE)
    check_weight_shape(w.shape, x.shape, position_shape)
    if w.shape == position_shape:
        flat = w.reshape(-1)
    else:
        flat = w
        inner = math.prod(position_shape[1:])
        if inner > 1:
            flat = np.repeat(w, inner)
    flat = np.ascontiguousarray(flat, dtype=np.float64)
    bad, _, _, _ = nm.weight_stats(flat, 0, 0.0, 0.0)
    if bad >= 0:
        raise InvalidArgumentError(
            f"sample_weight.data[{_source_index(bad, w.shape, position_shape)}]",
            f"{flat[bad]!r}: weights must be finite and >= 0", VALUE_OUT_OF_RANGE)
    return flat


def check_weight_shape(shape: tuple[int, ...], x_shape: tuple[int, ...],
                       position_shape: tuple[int, ...]) -> None:
    """Sample weights are per batch row or per position (ComputeStream checks the shapes
    the caller gave here too, before its client merged axes into rows)."""
    if shape != position_shape and shape != x_shape[:1]:
        raise InvalidArgumentError(
            "sample_weight.shape", f"{shape} must be {x_shape[:1]} (batch axis) or the "
            f"per-position shape {position_shape}", SHAPE_MISMATCH)


def _source_index(flat_index: int, given: tuple[int, ...], position_shape: tuple[int, ...]) -> int:
    """Map an index into the expanded per-position weights back to the sent array."""
    if given == position_shape or len(given) != 1:
        return flat_index
    return flat_index // max(1, math.prod(position_shape[1:]))


def _variance(value: Any, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The variances as a flat array like the predictions (converted to their dtype), and
    the shape they came in: the predictions' shape, or that shape with the last axis 1 or
    without it (PyTorch GaussianNLLLoss's forms: shared along the last axis, then repeated
    here)."""
    if value is None:
        raise InvalidArgumentError("variance", "gaussian_nll needs a variance tensor",
                                   MISSING_FIELD)
    v = _array(value, "variance")
    if v.dtype.kind not in "fiu" or v.dtype.kind == "b":
        raise InvalidArgumentError(
            "variance.dtype", f"{v.dtype} is not supported; use float32 or float64",
            UNSUPPORTED_DTYPE)
    if v.shape not in (x.shape, x.shape[:-1] + (1,), x.shape[:-1]):
        raise InvalidArgumentError(
            "variance.shape", f"{v.shape} must be the predictions' shape {x.shape}, or it "
            f"with the last axis 1 or without it", SHAPE_MISMATCH)
    flat = _convert(v, x.dtype, "variance").reshape(-1)
    if v.shape != x.shape:
        flat = np.repeat(flat, x.shape[-1])
    return flat, v.shape


def variance_gradient(batch: Batch, grad: np.ndarray) -> np.ndarray:
    """The gradient w.r.t. the variance in the shape it came in: a variance shared along
    the last axis gets the sum over that axis (float64, then the predictions' dtype)."""
    if batch.v_shape == batch.shape:
        return grad.reshape(batch.shape)
    summed = grad.reshape(-1, batch.shape[-1]).sum(axis=1, dtype=np.float64)
    return summed.astype(grad.dtype).reshape(batch.v_shape)


@dataclass(frozen=True)
class Bound:
    """A lower bound on the values of one input, checked only when the loss came out
    non-finite (the kernels poison values outside their loss's domain)."""

    field: str  # "predictions", "targets" or "variance"
    minimum: float
    inclusive: bool
    what: str


def check_bounds(batch: Batch, total: float, bounds: tuple[Bound, ...]) -> None:
    """After ``check_nonfinite_total``: name the first value below its bound, if any."""
    if math.isfinite(total):
        return
    for bound in bounds:
        arr = {"predictions": batch.x, "targets": batch.t, "variance": batch.v}[bound.field]
        flat = arr.reshape(-1)
        low = bound.minimum if bound.inclusive else float(np.nextafter(bound.minimum, np.inf))
        bad = nm.first_outside(flat, low, math.inf)
        if bad < 0:
            continue
        index = bad
        if bound.field == "variance" and batch.v_shape != batch.shape:
            index = bad // batch.shape[-1]  # the variance was repeated along the last axis
        raise InvalidArgumentError(f"{bound.field}.data[{index}]",
                                   f"{flat[bad]!r}: {bound.what}", VALUE_OUT_OF_RANGE)


def _first_nonfinite(arr: np.ndarray, field: str) -> None:
    bad = nm.first_nonfinite(arr.reshape(-1))
    if bad >= 0:
        raise InvalidArgumentError(
            f"{field}.data[{bad}]",
            f"{arr.reshape(-1)[bad]!r} is not finite (set allow_nonfinite to accept NaN/Inf)",
            NONFINITE_INPUT)


def _first_outside_unit(arr: np.ndarray, field: str, what: str) -> None:
    flat = arr.reshape(-1)
    bad = nm.first_outside(flat, 0.0, 1.0)
    if bad >= 0:
        raise InvalidArgumentError(
            f"{field}.data[{bad}]", f"{flat[bad]!r} is outside [0, 1] ({what} required)",
            VALUE_OUT_OF_RANGE)


def check_nonfinite_total(batch: Batch, total: float, x_unit: bool, t_unit: bool) -> None:
    """Kernels poison the sum with NaN/Inf when an input is invalid, so valid requests pay
    no extra pass. Only a non-finite sum looks for the first offending value; if there is
    none (a genuine overflow, or NaN/Inf the request allowed) the result stands."""
    if math.isfinite(total):
        return
    if not batch.allow_nonfinite:
        _first_nonfinite(batch.x, "predictions")
        if batch.t.dtype.kind == "f":
            _first_nonfinite(batch.t, "targets")
        if batch.v.size:
            step = batch.v.size // math.prod(batch.v_shape)  # > 1 where it was repeated
            _first_nonfinite(np.ascontiguousarray(batch.v[::step]), "variance")
    if x_unit:
        _first_outside_unit(batch.x, "predictions", "probabilities")
    if t_unit:
        _first_outside_unit(batch.t, "targets", "probabilities")


def sparse_weights(params: dict[str, Any], t: np.ndarray, c: int,
                    w: np.ndarray) -> tuple[float, int]:
    cw = params["class_weight"]
    if cw is None:
        cw = _EMPTY_F8
    elif cw.size != c:
        raise InvalidArgumentError(
            "params.class_weight", f"has {cw.size} entries; predictions have {c} classes",
            SHAPE_MISMATCH)
    params["class_weight"] = cw
    ignore = params["ignore_index"]
    params["ignore_index"] = _NO_IGNORE if ignore is None else ignore
    bad, total, acc, counted = label_stats(t, c, params["ignore_index"], cw, w, 0, 0.0, 0.0)
    if bad >= 0:
        raise InvalidArgumentError(
            f"targets.data[{bad}]", f"class index {t[bad]} is outside [0, {c})",
            LABEL_OUT_OF_RANGE)
    return total + acc, counted


