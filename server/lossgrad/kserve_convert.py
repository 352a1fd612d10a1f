"""Conversion between the Open Inference Protocol's ModelInfer messages and the engine's
arguments and result (for :mod:`lossgrad.kserve`).

Inputs become wire tensors over the raw bytes (or over arrays built from the typed
contents) that :func:`lossgrad.wire.decode_tensor` validates as it does for
``lossgrad.v1``; request parameters become the engine's keyword arguments; the engine's
errors get the protocol's names in their field. Raw outputs are written into the
serialized response once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from lossgrad_client import _wire
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._wire.encode import _put_raw_varint

from . import catalog, engine, wire
from ._proto.inference import grpc_predict_v2_pb2 as kpb
from .catalog import LossSpec, ParamType
from .errors import (
    BYTE_SIZE_MISMATCH,
    MALFORMED_REQUEST,
    MISSING_FIELD,
    PARAMETER_OUT_OF_RANGE,
    UNKNOWN_PARAMETER,
    UNKNOWN_TENSOR,
    UNSUPPORTED_DTYPE,
    InvalidArgumentError,
    LossgradError,
)

PREDICTIONS, TARGETS, SAMPLE_WEIGHT = "PREDICTIONS", "TARGETS", "SAMPLE_WEIGHT"
VARIANCE = "VARIANCE"  # the third input of the losses that take one (gaussian_nll)
INPUTS = (PREDICTIONS, TARGETS, SAMPLE_WEIGHT, VARIANCE)
LOSS, GRADIENT, HESSIAN = "LOSS", "GRADIENT", "HESSIAN"
VARIANCE_GRADIENT = "VARIANCE_GRADIENT"
# Request parameters that are not loss parameters.
REDUCTION, ALLOW_NONFINITE = "reduction", "allow_nonfinite"
HESSIAN_MODE, HESSIAN_BOUNDS = "hessian", ("hessian_floor", "hessian_constant")
# The number checks of a double parameter, for the Hessian's bounds (the engine checks
# their ranges).
_HESSIAN_BOUND = catalog.ParamSpec("hessian_bound", ParamType.DOUBLE, None, "")
# Triton's own request parameters: the scheduling hints tritonclient sends when asked
# (queue priority and queue timeout) and the reserved ``triton_`` ones that its tools
# send (perf_analyzer: triton_enable_empty_final_response). They steer Triton's
# scheduler and streaming, which lossgrad does not have; they change no result.
_IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
_IGNORED_PREFIX = "triton_"

# Protocol datatype <-> (lossgrad.v1 DataType, little-endian dtype, typed contents field).
# FP16 and BF16 have no typed contents field: they travel in raw_input_contents.
_DATATYPES: dict[str, tuple[int, np.dtype[Any], str]] = {
    "FP32": (pb.DATA_TYPE_FLOAT32, np.dtype("<f4"), "fp32_contents"),
    "FP64": (pb.DATA_TYPE_FLOAT64, np.dtype("<f8"), "fp64_contents"),
    "INT32": (pb.DATA_TYPE_INT32, np.dtype("<i4"), "int_contents"),
    "INT64": (pb.DATA_TYPE_INT64, np.dtype("<i8"), "int64_contents"),
    "FP16": (pb.DATA_TYPE_FLOAT16, wire.numpy_dtype("float16"), ""),
    "BF16": (pb.DATA_TYPE_BFLOAT16, wire.numpy_dtype("bfloat16"), ""),
}
_DATATYPE_OF = {dtype.name: name for name, (_, dtype, _) in _DATATYPES.items()}
# Engine field prefixes -> the protocol's names, for error fields.
_FIELD_NAMES = {"predictions": PREDICTIONS, "targets": TARGETS, "sample_weight": SAMPLE_WEIGHT,
                "variance": VARIANCE, "params": "parameters",
                **{key: f"parameters.{key}"
                   for key in (REDUCTION, HESSIAN_MODE, *HESSIAN_BOUNDS)}}


@dataclass(frozen=True)
class Output:
    """An output a model can give. ``default`` outputs are returned when the request
    names none; ``gradient`` says whether computing it needs the engine's gradient."""

    name: str
    gradient: bool
    default: bool = True


# HESSIAN (the diagonal Hessian, with the gradient) costs kernels of its own: only on request.
# VARIANCE_GRADIENT (the gradient w.r.t. VARIANCE) likewise, for the losses with a variance.
OUTPUTS: tuple[Output, ...] = (Output(LOSS, gradient=False), Output(GRADIENT, gradient=True),
                               Output(HESSIAN, gradient=True, default=False),
                               Output(VARIANCE_GRADIENT, gradient=True, default=False))
_OUTPUTS_BY_NAME = {out.name: out for out in OUTPUTS}


# --- request ------------------------------------------------------------------------

def input_tensors(request: kpb.ModelInferRequest) -> dict[str, _wire.Tensor]:
    """The inputs by name, as wire tensors over the raw bytes (no copy) or over an array
    built from the typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            "raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of inputs", MALFORMED_REQUEST)
    tensors: dict[str, _wire.Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in INPUTS:
            raise InvalidArgumentError(
                f"inputs[{index}].name", f"unknown input {name!r}; the inputs are "
                f"{PREDICTIONS}, {TARGETS}, (optional) {SAMPLE_WEIGHT} and, for the losses "
                f"that take one, {VARIANCE}", UNKNOWN_TENSOR)
        if name in tensors:
            raise InvalidArgumentError(f"inputs[{index}].name", f"input {name} is given twice",
                                       MALFORMED_REQUEST)
        found = _DATATYPES.get(tensor.datatype)
        if found is None:
            raise InvalidArgumentError(
                f"{name}.datatype", f"unsupported datatype {tensor.datatype!r}; use one of "
                + ", ".join(_DATATYPES), UNSUPPORTED_DTYPE)
        code, dtype, contents_field = found
        shape = tuple(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"{name}.contents", "give each input in raw_input_contents or in "
                    "contents, not both")
            data: _wire.Buffer = raw[index]
        elif not contents_field:
            raise InvalidArgumentError(
                f"{name}.contents", f"{tensor.datatype} has no typed contents field; send it "
                "in raw_input_contents", UNSUPPORTED_DTYPE)
        else:
            data = _typed_contents(tensor, name, shape, dtype, contents_field)
        tensors[name] = _wire.Tensor(code, shape, data)
    for name in (PREDICTIONS, TARGETS):
        if name not in tensors:
            raise InvalidArgumentError(name, f"required input {name} is missing", MISSING_FIELD)
    return tensors


def _typed_contents(tensor: kpb.ModelInferRequest.InferInputTensor, name: str,
                    shape: tuple[int, ...], dtype: np.dtype[Any], field: str) -> bytes:
    """The little-endian bytes of an input given in its typed contents field."""
    values = getattr(tensor.contents, field)
    expected = math.prod(shape) if all(d >= 0 for d in shape) else None
    if expected is not None and len(values) != expected:
        raise InvalidArgumentError(
            f"{name}.contents.{field}", f"has {len(values)} values; shape {list(shape)} "
            f"needs {expected}", BYTE_SIZE_MISMATCH)
    return np.asarray(values, dtype=dtype).tobytes()


def requested_outputs(request: kpb.ModelInferRequest) -> tuple[Output, ...]:
    if not request.outputs:
        return tuple(out for out in OUTPUTS if out.default)
    chosen: list[Output] = []
    for index, requested in enumerate(request.outputs):
        out = _OUTPUTS_BY_NAME.get(requested.name)
        if out is None:
            raise InvalidArgumentError(
                f"outputs[{index}].name", f"unknown output {requested.name!r}; the outputs "
                f"are {', '.join(_OUTPUTS_BY_NAME)}", UNKNOWN_TENSOR)
        if out not in chosen:
            chosen.append(out)
    return tuple(chosen)


def request_options(parameters: Any, spec: LossSpec) -> dict[str, Any]:
    """The engine's keyword arguments from the request parameters: ``reduction``
    (string), ``allow_nonfinite`` (bool) and the loss's parameters, each from the
    InferParameter field of its type (a double parameter also takes an integer; a list
    parameter such as ``class_weight`` is a JSON array in a string)."""
    options: dict[str, Any] = {}
    for key, param in parameters.items():
        field = f"parameters.{key}"
        kind = param.WhichOneof("parameter_choice")
        value = None if kind is None else getattr(param, kind)
        if key == REDUCTION:
            if kind != "string_param":
                raise InvalidArgumentError(field, "must be a string: none, sum or mean",
                                           PARAMETER_OUT_OF_RANGE)
            options[REDUCTION] = value
            continue
        if key == ALLOW_NONFINITE:
            options[ALLOW_NONFINITE] = _bool(field, value)
            continue
        if key == HESSIAN_MODE:
            if kind != "string_param":
                raise InvalidArgumentError(field, "must be a string: exact, clipped or "
                                           "constant", PARAMETER_OUT_OF_RANGE)
            options[HESSIAN_MODE] = value
            continue
        if key in HESSIAN_BOUNDS:
            options[key] = _param_value(_HESSIAN_BOUND, field, value)
            continue
        if key in _IGNORED_PARAMETERS or key.startswith(_IGNORED_PREFIX):
            continue
        p = spec.param(key)
        options[key] = value if p is None else _param_value(p, field, value)
    return options


def settle_hessian(options: dict[str, Any], outputs: tuple[Output, ...]) -> None:
    """The output HESSIAN takes the ``hessian`` mode parameter (``exact`` when it is not
    given); without that output, the Hessian parameters are an error."""
    if any(out.name == HESSIAN for out in outputs):
        options.setdefault(HESSIAN_MODE, "exact")
        return
    for key in (HESSIAN_MODE, *HESSIAN_BOUNDS):
        if key in options:
            raise InvalidArgumentError(f"parameters.{key}", f"applies only when the output "
                                       f"{HESSIAN} is requested", UNKNOWN_PARAMETER)


def _param_value(p: catalog.ParamSpec, field: str, value: Any) -> Any:
    """Convert an InferParameter's value to what the engine's range checks take."""
    if p.type is ParamType.BOOL:
        return _bool(field, value)
    if p.type is ParamType.DOUBLE_LIST and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise InvalidArgumentError(field, f"must be a JSON array of numbers, got {value!r}",
                                       PARAMETER_OUT_OF_RANGE) from None
    if isinstance(value, (str, bool)) or (p.type is ParamType.DOUBLE_LIST and value is not None):
        what = {ParamType.DOUBLE: "a number (double_param or int64_param)",
                ParamType.INT64: "an integer (int64_param)",
                ParamType.DOUBLE_LIST: "a JSON array of numbers (string_param)"}[p.type]
        raise InvalidArgumentError(field, f"must be {what}, got {value!r}",
                                   PARAMETER_OUT_OF_RANGE)
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(field, f"must be a bool (bool_param), got {value!r}",
                                   PARAMETER_OUT_OF_RANGE)
    return value


@contextmanager
def protocol_fields() -> Iterator[None]:
    """Rename the engine's error fields to the protocol's names (``predictions.shape``
    -> ``PREDICTIONS.shape``, ``params.delta`` -> ``parameters.delta``)."""
    try:
        yield
    except LossgradError as err:
        head, dot, rest = err.field.partition(".")
        name = _FIELD_NAMES.get(head)
        if name is None:
            raise
        raise type(err)(f"{name}{dot}{rest}", err.message, err.reason) from None


# --- response -----------------------------------------------------------------------

@dataclass(frozen=True)
class InferResponse:
    """A ModelInferResponse whose raw outputs are still arrays: :func:`serialize_infer`
    writes each array's bytes once, into the message (the generated class would copy
    them into a ``bytes``, into the message, then into the serialized message)."""

    message: kpb.ModelInferResponse  # everything but raw_output_contents
    raw: tuple[np.ndarray, ...]  # little-endian, C-contiguous


def serialize_infer(response: InferResponse | kpb.ModelInferResponse) -> bytes:
    """ModelInfer's response serializer: the message, then field 6 (raw_output_contents)
    once per array; protobuf appends a repeated field's entries in the order they come."""
    if isinstance(response, kpb.ModelInferResponse):
        return bytes(response.SerializeToString())
    parts: list[bytes | memoryview] = [response.message.SerializeToString()]
    for array in response.raw:
        head = bytearray([_RAW_OUTPUT_CONTENTS_TAG])
        _put_raw_varint(head, array.nbytes)
        parts += [bytes(head), memoryview(array.reshape(-1).view(np.uint8))]
    return b"".join(parts)


_RAW_OUTPUT_CONTENTS_TAG = 6 << 3 | 2  # field 6, length-delimited


def response(request: kpb.ModelInferRequest, model_version: str, outputs: tuple[Output, ...],
             result: engine.Result, raw: bool) -> InferResponse:
    """The outputs as raw bytes (or as typed contents when the inputs came typed)."""
    message = kpb.ModelInferResponse(model_name=request.model_name,
                                     model_version=model_version, id=request.id)
    arrays = []
    for out in outputs:
        if out.name == LOSS:
            array = np.asarray(result.loss, dtype=np.float64).reshape(
                np.shape(result.loss) or (1,))
        else:
            array = {GRADIENT: result.gradient, HESSIAN: result.hessian,
                     VARIANCE_GRADIENT: result.variance_gradient}[out.name]
        if array is None:  # VARIANCE_GRADIENT of a loss without a variance
            raise InvalidArgumentError("outputs", f"model {request.model_name!r} has no "
                                       f"output {out.name}", UNKNOWN_TENSOR)
        datatype = _DATATYPE_OF[array.dtype.name]
        tensor = message.outputs.add(name=out.name, datatype=datatype, shape=array.shape)
        little = np.ascontiguousarray(array, dtype=_DATATYPES[datatype][1])
        if raw:
            arrays.append(little)
        else:
            getattr(tensor.contents, _DATATYPES[datatype][2]).extend(little.reshape(-1).tolist())
    return InferResponse(message, tuple(arrays))
