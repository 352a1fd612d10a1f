"""NumPy arrays to ``lossgrad.v1`` Tensor messages and back.

Encoding takes anything ``np.asarray`` takes (arrays, nested lists, CPU torch tensors
through ``__array__``) and writes one ``tobytes``. Decoding returns a read-only
``np.frombuffer`` view of the message bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from .errors import InternalError, InvalidArgumentError

UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"

_WIRE: dict[str, tuple[pb.DataType.ValueType, np.dtype[Any]]] = {
    "float32": (pb.DATA_TYPE_FLOAT32, np.dtype("<f4")),
    "float64": (pb.DATA_TYPE_FLOAT64, np.dtype("<f8")),
    "int32": (pb.DATA_TYPE_INT32, np.dtype("<i4")),
    "int64": (pb.DATA_TYPE_INT64, np.dtype("<i8")),
}
_FROM_WIRE: dict[int, np.dtype[Any]] = {code: dtype for code, dtype in _WIRE.values()}
# Integer types that int64 holds exactly (class indices or labels of a narrow type).
_WIDEN_TO_INT64 = frozenset(("int8", "int16", "uint8", "uint16", "uint32"))


def as_array(value: Any, field: str) -> npt.NDArray[Any]:
    """Return ``value`` as a little-endian array of a wire dtype, without copying if it is one.

    float32/float64/int32/int64 pass through; Python lists of floats become float64 and
    of ints int64; narrower integers widen to int64. Anything else (bool, float16,
    complex, objects) raises InvalidArgumentError naming ``field``.
    """
    if hasattr(value, "detach") and getattr(value, "requires_grad", False):
        value = value.detach()  # a torch tensor that requires grad refuses __array__
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"{field}: cannot convert {type(value).__name__} to an array: {err}",
            reason=UNSUPPORTED_DTYPE, field=field) from err
    name = array.dtype.name
    if name in _WIDEN_TO_INT64 or (
        name == "int32" and isinstance(value, (list, tuple, int))  # platform default int
    ):
        array = array.astype(np.int64)
    elif name not in _WIRE:
        raise InvalidArgumentError(
            f"{field}.dtype: unsupported dtype {array.dtype}; use float32 or float64 "
            "(int32 or int64 for class indices and labels)",
            reason=UNSUPPORTED_DTYPE, field=f"{field}.dtype")
    return array.astype(_WIRE[array.dtype.name][1], copy=False)


def to_tensor(value: Any, field: str) -> pb.Tensor:
    """Encode ``value`` (see :func:`as_array`) as a Tensor message."""
    array = as_array(value, field)
    return pb.Tensor(
        dtype=_WIRE[array.dtype.name][0],
        shape=array.shape,
        data=array.tobytes(order="C"),
    )


def from_tensor(tensor: pb.Tensor, field: str) -> npt.NDArray[Any]:
    """Decode a Tensor message as a read-only array viewing its bytes."""
    dtype = _FROM_WIRE.get(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape)
    data = tensor.data
    if dtype is None or min(shape, default=0) < 0 or (
        len(data) != math.prod(shape) * dtype.itemsize
    ):
        raise InternalError(
            f"malformed {field} tensor in the response: dtype {tensor.dtype}, shape "
            f"{list(shape)}, {len(data)} bytes", field=field)
    return np.frombuffer(data, dtype=dtype).reshape(shape)
