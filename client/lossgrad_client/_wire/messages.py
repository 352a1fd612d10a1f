"""The messages of the codec, its errors and the wire-format constants it shares."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from .._proto.lossgrad.v1 import lossgrad_pb2 as pb

Buffer: TypeAlias = "bytes | bytearray | memoryview"

# DataType by dtype name, and the little-endian dtype and item size of each DataType.
DATA_TYPES: dict[str, int] = {
    "float32": pb.DATA_TYPE_FLOAT32,
    "float64": pb.DATA_TYPE_FLOAT64,
    "int32": pb.DATA_TYPE_INT32,
    "int64": pb.DATA_TYPE_INT64,
    "float16": pb.DATA_TYPE_FLOAT16,
}
LITTLE_ENDIAN: dict[int, np.dtype[Any]] = {
    code: np.dtype(name).newbyteorder("<") for name, code in DATA_TYPES.items()
}
DATA_TYPES["bfloat16"] = pb.DATA_TYPE_BFLOAT16  # its dtype comes from ml_dtypes, if at all
ITEMSIZES = {code: dtype.itemsize for code, dtype in LITTLE_ENDIAN.items()}
ITEMSIZES[pb.DATA_TYPE_BFLOAT16] = 2
_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in LITTLE_ENDIAN.items()}

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types; 3 and 4 are groups
MASK64 = (1 << 64) - 1


def data_type(dtype: np.dtype[Any]) -> int | None:
    """The DataType of a NumPy dtype of either byte order, or None if it has none.
    (By kind and size: ``dtype.name`` costs microseconds, this is a dict lookup; only
    ml_dtypes' bfloat16, of kind "V", needs its name.)"""
    code = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None and dtype.kind == "V" and dtype.name == "bfloat16":
        return pb.DATA_TYPE_BFLOAT16
    return code


def wire_dtype(code: int) -> np.dtype[Any] | None:
    """The little-endian NumPy dtype of a DataType value, or None if there is none here.

    BFLOAT16 has one only where ml_dtypes is installed: the client does not depend on it
    (a bfloat16 array, or a response to one, exists only where it is), the server does.
    """
    dtype = LITTLE_ENDIAN.get(code)
    if dtype is None and code == pb.DATA_TYPE_BFLOAT16:
        module: Any = sys.modules.get("ml_dtypes")
        if module is None:
            try:
                import ml_dtypes as module
            except ImportError:
                return None
        bfloat16: np.dtype[Any] = np.dtype(module.bfloat16)
        return bfloat16
    return dtype


class WireError(ValueError):
    """Bytes that are not a valid message. ``field`` is the field where parsing stopped
    (``"predictions.shape"``), or ``"request"``/``"response"`` for the message itself."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SharedMemoryLocation:
    """A SharedMemoryLocation message: ``byte_size`` bytes at ``offset`` in the registered
    shared-memory region called ``region``."""

    region: str = ""
    offset: int = 0
    byte_size: int = 0


@dataclass(frozen=True)
class Tensor:
    """A Tensor message: its DataType value, its dimensions and its bytes (little-endian,
    C order; a view of the message it was parsed from, or of the array it encodes).
    With ``shared_memory`` set, the bytes are there instead and ``data`` is empty."""

    dtype: int
    shape: tuple[int, ...]
    data: Buffer
    shared_memory: SharedMemoryLocation | None = None

    @classmethod
    def of(cls, array: npt.NDArray[Any]) -> Tensor:
        """Wrap an array of a wire dtype without copying it (unless it is big-endian or
        not C-contiguous)."""
        code = data_type(array.dtype)
        little_dtype = None if code is None else wire_dtype(code)
        if code is None or little_dtype is None:
            raise ValueError(f"no wire DataType for dtype {array.dtype}")
        little = array.astype(little_dtype, order="C", copy=False)
        return cls(code, tuple(little.shape), little.reshape(-1).view(np.uint8).data)


@dataclass(frozen=True)
class ComputeRequest:
    """A ComputeLossRequest or ComputeGradientRequest (the same fields; the ``hessian*``
    fields are the gradient request's only). A message field or ``optional`` scalar that
    is not set is None."""

    loss: str = ""
    predictions: Tensor | None = None
    targets: Tensor | None = None
    sample_weight: Tensor | None = None
    reduction: int = 0
    params: pb.LossParams | None = None
    allow_nonfinite: bool = False
    hessian: int = 0
    hessian_floor: float | None = None
    hessian_constant: float | None = None
    gradient_output: SharedMemoryLocation | None = None
    losses_output: SharedMemoryLocation | None = None
    variance: Tensor | None = None


@dataclass(frozen=True)
class ComputeResponse:
    """A ComputeLossResponse or ComputeGradientResponse (``gradient`` and ``hessian`` are
    only in the latter). A message field that is not set is None."""

    loss: float = 0.0
    losses: Tensor | None = None
    positions: int = 0
    positions_counted: int = 0
    weight_sum: float = 0.0
    gradient: Tensor | None = None
    hessian: Tensor | None = None
    variance_gradient: Tensor | None = None


@dataclass(frozen=True)
class StreamRequest:
    """A ComputeStreamRequest: the header (first message) or a chunk's tensors."""

    header: pb.ComputeStreamHeader | None = None
    predictions: Tensor | None = None
    targets: Tensor | None = None
    sample_weight: Tensor | None = None


@dataclass(frozen=True)
class StreamResponse:
    """A ComputeStreamResponse: ready (first), gradient/losses chunks, or the summary."""

    ready: pb.ComputeStreamReady | None = None
    gradient: Tensor | None = None
    losses: Tensor | None = None
    summary: pb.ComputeLossResponse | None = None
