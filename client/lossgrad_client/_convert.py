"""NumPy arrays to ``lossgrad.v1`` tensors and back.

Encoding takes anything ``np.asarray`` takes (arrays, nested lists, CPU torch tensors
through ``__array__``) and wraps the array without copying it; its bytes are copied
once, into the request message. Decoding returns a read-only ``np.frombuffer`` view of
the response bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from ._wire import Tensor, data_type, wire_dtype
from .errors import InternalError, InvalidArgumentError

UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"

# Integer types that int64 holds exactly (class indices or labels of a narrow type), by
# (kind, itemsize): int8, int16, uint8, uint16, uint32.
_WIDEN_TO_INT64 = frozenset((("i", 1), ("i", 2), ("u", 1), ("u", 2), ("u", 4)))


def as_array(value: Any, field: str) -> npt.NDArray[Any]:
    """Return ``value`` as a little-endian array of a wire dtype, without copying if it is one.

    float16/bfloat16/float32/float64/int32/int64 pass through (bfloat16 is ml_dtypes'
    type); Python lists of floats become float64 and of ints int64; narrower integers
    widen to int64. Anything else (bool, complex, objects) raises InvalidArgumentError
    naming ``field``.
    """
    if hasattr(value, "detach") and getattr(value, "requires_grad", False):
        value = value.detach()  # a torch tensor that requires grad refuses __array__
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"{field}: cannot convert {type(value).__name__} to an array: {err}",
            reason=UNSUPPORTED_DTYPE, field=field) from err
    kind = (array.dtype.kind, array.dtype.itemsize)
    if kind in _WIDEN_TO_INT64 or (
        kind == ("i", 4) and isinstance(value, (list, tuple, int))  # platform default int
    ):
        array = array.astype(np.int64)
    code = data_type(array.dtype)
    dtype = None if code is None else wire_dtype(code)
    if dtype is None:
        raise InvalidArgumentError(
            f"{field}.dtype: unsupported dtype {array.dtype}; use float16, bfloat16, float32 "
            "or float64 (int32 or int64 for class indices and labels)",
            reason=UNSUPPORTED_DTYPE, field=f"{field}.dtype")
    return array.astype(dtype, copy=False)


def to_tensor(value: Any, field: str) -> Tensor:
    """Encode ``value`` (see :func:`as_array`) as a tensor that views the array's bytes."""
    return Tensor.of(as_array(value, field))


def from_tensor(tensor: Tensor | None, field: str) -> npt.NDArray[Any]:
    """Decode a response tensor as a read-only array viewing the response bytes."""
    if tensor is None:
        tensor = Tensor(0, (), b"")  # what a generated message reads for a field not set
    dtype = wire_dtype(tensor.dtype)
    shape = tensor.shape
    size = memoryview(tensor.data).nbytes
    if dtype is None or min(shape, default=0) < 0 or size != math.prod(shape) * dtype.itemsize:
        raise InternalError(
            f"malformed {field} tensor in the response: dtype {tensor.dtype}, shape "
            f"{list(shape)}, {size} bytes", field=field)
    try:
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as err:  # a zero-sized shape too large for NumPy
        raise InternalError(f"malformed {field} tensor in the response: {err}",
                            field=field) from None
    if not array.flags.aligned:  # a layout that does not align it: copied, still read-only
        array = array.copy()
        array.flags.writeable = False
    return array
