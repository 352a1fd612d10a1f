"""Wire conversion: ``lossgrad.v1`` messages to engine arguments and back.

The Compute* messages go through the hand-written codec of the client package
(``lossgrad_client._wire``): the request is parsed without copying its tensors, and
the response is serialized with one copy of each array. Decoding validates only what
the wire format itself promises (a known dtype, non-negative dimensions,
``prod(shape) * itemsize`` bytes); what a value means for a loss is the engine's
business. Arrays are read-only views of the request bytes; a tensor whose bytes sit at
an offset that is not a multiple of its item size is copied once, so that the kernels
always see aligned arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from lossgrad_client import _wire
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

from .engine import HessianMode, Reduction
from .errors import (
    BYTE_SIZE_MISMATCH,
    DUPLICATE_PARAMETER,
    MALFORMED_REQUEST,
    MISSING_FIELD,
    NEGATIVE_DIMENSION,
    TOO_MANY_ELEMENTS,
    UNKNOWN_HESSIAN_MODE,
    UNKNOWN_REDUCTION,
    UNSUPPORTED_DTYPE,
    InvalidArgumentError,
    ResourceExhaustedError,
)

# DataType -> little-endian NumPy dtype, and back by dtype name.
_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
_DATA_TYPES: dict[str, int] = {dt.name: code for code, dt in _DTYPES.items()}

_REDUCTIONS: dict[int, Reduction] = {
    pb.REDUCTION_UNSPECIFIED: Reduction.MEAN,
    pb.REDUCTION_NONE: Reduction.NONE,
    pb.REDUCTION_SUM: Reduction.SUM,
    pb.REDUCTION_MEAN: Reduction.MEAN,
}

_HESSIAN_MODES: dict[int, HessianMode | None] = {
    pb.HESSIAN_MODE_UNSPECIFIED: None,
    pb.HESSIAN_MODE_EXACT: HessianMode.EXACT,
    pb.HESSIAN_MODE_CLIPPED: HessianMode.CLIPPED,
    pb.HESSIAN_MODE_CONSTANT: HessianMode.CONSTANT,
}

# The largest array NumPy can describe, in bytes; zero-sized dimensions count as 1
# because NumPy checks the product of the others too.
_MAX_NBYTES = int(np.iinfo(np.intp).max)
_MAX_NDIM = 64

# LossParams scalar fields, all ``optional`` in the proto (HasField works on them).
_SCALAR_PARAMS = ("delta", "from_logits", "pos_weight", "label_smoothing", "ignore_index",
                  "log_predictions", "beta", "quantile", "log_input", "full", "power", "alpha",
                  "gamma")


def data_type(dtype: np.dtype[Any]) -> int:
    """Return the DataType enum value for a NumPy dtype of any byte order."""
    try:
        return _DATA_TYPES[dtype.name]
    except KeyError:
        raise ValueError(f"no wire DataType for dtype {dtype}") from None


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The little-endian NumPy dtype of a dtype name ("bfloat16" is ml_dtypes')."""
    return _DTYPES[_DATA_TYPES[name]]


def deserialize_request(data: bytes) -> _wire.ComputeRequest | _wire.WireError:
    """The gRPC request deserializer of ComputeLoss and ComputeGradient. Never raises: a
    deserializer that raises ends the call with a bare INTERNAL, so a malformed message
    is returned as its WireError, and :func:`parsed` reports it as INVALID_ARGUMENT."""
    try:
        return _wire.parse_request(data)
    except _wire.WireError as err:
        return err


def parsed(request: _wire.ComputeRequest | _wire.WireError) -> _wire.ComputeRequest:
    """Return the parsed request, or raise MALFORMED_REQUEST for bytes that were not one."""
    if isinstance(request, _wire.WireError):
        raise parsed_error(request, "request")
    return request


def parsed_error(err: _wire.WireError, field: str) -> InvalidArgumentError:
    """MALFORMED_REQUEST for the bytes of ``field`` that were not a valid message."""
    return InvalidArgumentError(field, f"not a valid protobuf message: {err}", MALFORMED_REQUEST)


def deserialize_stream_request(data: bytes) -> _wire.StreamRequest | _wire.WireError:
    """The request deserializer of ComputeStream; never raises (see deserialize_request)."""
    try:
        return _wire.parse_stream_request(data)
    except _wire.WireError as err:
        return err


def decode_tensor(tensor: _wire.Tensor, field: str) -> np.ndarray:
    """Return a read-only array that views ``tensor.data``; validate dtype, shape and size."""
    data = memoryview(tensor.data)
    dtype = tensor_layout(tensor, field, data.nbytes, f"{field}.data")
    array = np.frombuffer(data, dtype=dtype).reshape(tensor.shape)
    if not array.flags.aligned:
        array = array.copy()
        array.flags.writeable = False
    return array


def tensor_layout(tensor: _wire.Tensor, field: str, nbytes: int,
                  nbytes_field: str) -> np.dtype[Any]:
    """Validate a tensor's dtype, its shape and its size (``nbytes``, which the field
    ``nbytes_field`` gives); return its NumPy dtype."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else None
        shown = name or f"unknown value {tensor.dtype}"
        raise InvalidArgumentError(
            f"{field}.dtype", f"unsupported dtype {shown}; expected one of "
            + ", ".join(pb.DataType.Name(code) for code in _DTYPES), UNSUPPORTED_DTYPE)
    shape = tensor.shape
    if shape and min(shape) < 0:
        axis, dim = next((axis, dim) for axis, dim in enumerate(shape) if dim < 0)
        raise InvalidArgumentError(
            f"{field}.shape[{axis}]", f"dimension {dim} is negative", NEGATIVE_DIMENSION)
    if len(shape) > _MAX_NDIM:
        raise InvalidArgumentError(
            f"{field}.shape", f"{len(shape)} dimensions; at most {_MAX_NDIM} are supported")
    # Python ints: a huge declared shape is rejected before anything is allocated.
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise InvalidArgumentError(
            nbytes_field,
            f"{nbytes} bytes, but shape {list(shape)} of {pb.DataType.Name(tensor.dtype)} "
            f"needs {expected}", BYTE_SIZE_MISMATCH)
    # With no zero dimension the size is that of the received bytes, which exist.
    if not expected and math.prod(max(d, 1) for d in shape) * dtype.itemsize > _MAX_NBYTES:
        raise InvalidArgumentError(f"{field}.shape", f"shape {list(shape)} is too large")
    return dtype


TensorDecoder = Callable[[_wire.Tensor, str], np.ndarray]


def check_elements(request: _wire.ComputeRequest, limit: int | None) -> int:
    """Return the elements the request's tensors declare (from their shapes, before any
    array exists); ResourceExhaustedError when that is over ``limit`` (None: no limit)."""
    tensors = (("predictions", request.predictions), ("targets", request.targets),
               ("sample_weight", request.sample_weight), ("variance", request.variance))
    # Negative dimensions count as 0 here; decode_tensor rejects them.
    total = sum(math.prod(max(d, 0) for d in t.shape) for _, t in tensors if t is not None)
    if limit is not None and total > limit:
        raise ResourceExhaustedError(
            "request", f"the tensors declare {total} elements; the limit is {limit} "
            "per request (--max-elements)", TOO_MANY_ELEMENTS)
    return int(total)


def decode_required(tensor: _wire.Tensor | None, name: str,
                    decode: TensorDecoder = decode_tensor) -> np.ndarray:
    """Decode the tensor field ``name`` of a request; MISSING_FIELD when it is not set.
    ``decode`` reads the tensor (the shared-memory scope's for requests that use it)."""
    if tensor is None:
        raise InvalidArgumentError(name, "required tensor is not set", MISSING_FIELD)
    return decode(tensor, name)


def decode_optional(tensor: _wire.Tensor | None, name: str,
                    decode: TensorDecoder = decode_tensor) -> np.ndarray | None:
    """Decode the tensor field ``name`` of a request, or return None when it is not set."""
    return None if tensor is None else decode(tensor, name)


def encode_tensor(array: np.ndarray) -> _wire.Tensor:
    """A response tensor that wraps ``array`` (no copy unless it is big-endian or strided);
    its bytes are copied once, when the response is serialized."""
    return _wire.Tensor.of(array)


def decode_reduction(value: int) -> Reduction:
    """Map the Reduction enum (UNSPECIFIED means MEAN) to the engine's Reduction."""
    try:
        return _REDUCTIONS[value]
    except KeyError:
        raise InvalidArgumentError(
            "reduction", f"unknown reduction value {value}", UNKNOWN_REDUCTION) from None


def hessian_options(request: _wire.ComputeRequest) -> dict[str, Any]:
    """The engine's Hessian arguments from a ComputeGradientRequest (the mode as the
    engine's HessianMode, None when unset; the floor and constant None when unset)."""
    try:
        mode = _HESSIAN_MODES[request.hessian]
    except KeyError:
        raise InvalidArgumentError(
            "hessian", f"unknown Hessian mode value {request.hessian}",
            UNKNOWN_HESSIAN_MODE) from None
    return {"hessian": mode, "hessian_floor": request.hessian_floor,
            "hessian_constant": request.hessian_constant}


def decode_params(params: pb.LossParams | None) -> dict[str, Any]:
    """Return the LossParams fields that are set, by name, and the entries of ``by_name``;
    unset fields are left out."""
    if params is None:
        return {}
    out: dict[str, Any] = {
        name: getattr(params, name) for name in _SCALAR_PARAMS if params.HasField(name)
    }
    if len(params.class_weight):
        out["class_weight"] = list(params.class_weight)
    for name, value in params.by_name.items():
        field = f"params.by_name[{name!r}]"
        if name in out:
            raise InvalidArgumentError(
                field, f"{name!r} is also set in its typed field params.{name}",
                DUPLICATE_PARAMETER)
        kind = value.WhichOneof("value")
        if kind is None:
            raise InvalidArgumentError(field, "no value is set", MISSING_FIELD)
        item = getattr(value, kind)
        out[name] = list(item.values) if kind == "double_list_value" else item
    return out
