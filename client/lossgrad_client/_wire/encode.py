"""Serializing: small headers joined with the arrays' own buffers, one copy of each."""

from __future__ import annotations

import struct

from . import small
from .messages import (
    I64,
    ITEMSIZES,
    LEN,
    MASK64,
    VARINT,
    Buffer,
    ComputeRequest,
    ComputeResponse,
    SharedMemoryLocation,
    StreamRequest,
    StreamResponse,
    Tensor,
)

_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = bytes(8)


def serialize_request(request: ComputeRequest, *, align: bool = True) -> bytes:
    """Encode a ComputeLossRequest/ComputeGradientRequest; each tensor's bytes are copied
    once. With ``align``, each tensor's data starts at a multiple of its item size from the
    start of the message (see :func:`_put_tensor`); without, the bytes are those of
    ``SerializeToString(deterministic=True)``, which is also what a request whose tensors
    are small gets (:mod:`.small`)."""
    if small.tensors_fit(request.predictions, request.targets, request.sample_weight,
                         request.variance):
        data = small.serialize_request(request)
        if data is not None:
            return data
    head = bytearray()
    if request.loss:
        _put_bytes(head, 1, request.loss.encode("utf-8"))
    parts = _with_tensors(head, ((2, request.predictions), (3, request.targets),
                                 (4, request.sample_weight)), align)
    tail = bytearray()
    if request.reduction:
        _put_varint(tail, 5 << 3 | VARINT, request.reduction)
    if request.params is not None:
        _put_bytes(tail, 6, request.params.SerializeToString(deterministic=True))
    if request.allow_nonfinite:
        tail += b"\x38\x01"
    if request.hessian:
        _put_varint(tail, 8 << 3 | VARINT, request.hessian)
    for number, value in ((9, request.hessian_floor), (10, request.hessian_constant)):
        if value is not None:  # ``optional``: written when set, 0.0 included
            tail.append(number << 3 | I64)
            tail += _DOUBLE.pack(value)
    for number, location in ((12, request.gradient_output), (13, request.losses_output)):
        if location is not None:
            _put_bytes(tail, number, _location(location))
    parts.append(tail)
    if request.variance is not None:  # field 16 comes after the scalars
        offset = sum(len(part) if not isinstance(part, memoryview) else part.nbytes
                     for part in parts)
        _put_tensor(parts, offset, 16, request.variance, align)
    return b"".join(parts)


def serialize_response(response: ComputeResponse, *, align: bool = True) -> bytes:
    """Encode a ComputeLossResponse/ComputeGradientResponse (the latter when ``gradient``
    or ``hessian`` is set); each tensor's bytes are copied once. ``align`` as in
    :func:`serialize_request`, which also says what small responses get."""
    if small.tensors_fit(response.losses, response.gradient, response.hessian,
                         response.variance_gradient):
        data = small.serialize_response(response)
        if data is not None:
            return data
    head = bytearray()
    _put_double(head, 1, response.loss)
    parts: list[Buffer] = [head]
    offset = len(head)
    if response.losses is not None:
        offset = _put_tensor(parts, offset, 2, response.losses, align)
    middle = bytearray()
    if response.positions:
        _put_varint(middle, 3 << 3 | VARINT, response.positions)
    if response.positions_counted:
        _put_varint(middle, 4 << 3 | VARINT, response.positions_counted)
    _put_double(middle, 5, response.weight_sum)
    parts.append(middle)
    offset += len(middle)
    if response.gradient is not None:
        offset = _put_tensor(parts, offset, 6, response.gradient, align)
    if response.hessian is not None:
        offset = _put_tensor(parts, offset, 7, response.hessian, align)
    if response.variance_gradient is not None:
        _put_tensor(parts, offset, 14, response.variance_gradient, align)
    return b"".join(parts)


def serialize_stream_request(request: StreamRequest, *, align: bool = True) -> bytes:
    """Encode a ComputeStreamRequest: the header (small, by the generated class) and the
    chunk's tensors, each copied once. ``align`` as in :func:`serialize_request`."""
    head = bytearray()
    if request.header is not None:
        _put_bytes(head, 1, request.header.SerializeToString(deterministic=True))
    return b"".join(_with_tensors(head, ((2, request.predictions), (3, request.targets),
                                         (4, request.sample_weight)), align))


def serialize_stream_response(response: StreamResponse, *, align: bool = True) -> bytes:
    """Encode a ComputeStreamResponse; ``align`` as in :func:`serialize_request`."""
    head = bytearray()
    if response.ready is not None:
        _put_bytes(head, 1, response.ready.SerializeToString(deterministic=True))
    parts = _with_tensors(head, ((2, response.gradient), (3, response.losses)), align)
    if response.summary is not None:
        tail = bytearray()
        _put_bytes(tail, 4, response.summary.SerializeToString(deterministic=True))
        parts.append(tail)
    return b"".join(parts)


def _with_tensors(head: bytearray, tensors: tuple[tuple[int, Tensor | None], ...],
                  align: bool) -> list[Buffer]:
    """The parts of a message that starts with ``head``, then has the tensor fields
    (field number, tensor) that are set, each laid out by :func:`_put_tensor`."""
    parts: list[Buffer] = [head]
    offset = len(head)
    for number, tensor in tensors:
        if tensor is not None:
            offset = _put_tensor(parts, offset, number, tensor, align)
    return parts


def _put_tensor(parts: list[Buffer], offset: int, number: int, tensor: Tensor,
                align: bool) -> int:
    """Append the Tensor field ``number``, which starts ``offset`` bytes into the message:
    a header, then the data buffer itself (``b"".join`` copies it, once). Return the
    offset after it.

    With ``align`` the data starts at a multiple of the item size, so that a receiver
    whose buffer is aligned (CPython's bytes are) can view it as an aligned array. The
    canonical layout is kept when it aligns; otherwise two freedoms of the protobuf
    encoding, which every parser must accept, make it align: the first dimension as an
    unpacked field (one byte more or less than packed), and empty occurrences of the field
    before it (occurrences of an embedded message merge): up to three of two bytes each,
    or for a field number above 15 (a two-byte key) up to seven of three bytes each.
    """
    data = tensor.data
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    dtype = bytearray()
    if tensor.dtype:
        _put_varint(dtype, 1 << 3 | VARINT, tensor.dtype)
    data_key = bytearray()
    if size:
        _put_varint(data_key, 3 << 3 | LEN, size)
    location = bytearray()
    if tensor.shared_memory is not None:
        _put_bytes(location, 4, _location(tensor.shared_memory))
    key = bytearray()
    _put_raw_varint(key, number << 3 | LEN)  # two bytes from field 16 on
    fixed = len(dtype) + len(data_key) + size + len(location)  # the body without the shape
    shape = _shape_field(tensor.shape, unpacked=0)
    padding = 0
    itemsize = ITEMSIZES.get(tensor.dtype, 1) if align and size else 1

    def misalignment(padding: int, shape: bytearray) -> int:
        header = ((len(key) + 1) * padding + len(key) + _varint_size(fixed + len(shape))
                  + len(dtype) + len(shape) + len(data_key))
        return (offset + header) % itemsize

    if misalignment(0, shape):
        forms = [shape, _shape_field(tensor.shape, unpacked=1)] if tensor.shape else [shape]
        padding, shape = next(
            ((p, form) for p in range(8) for form in forms if not misalignment(p, form)),
            (0, shape))  # none (a scalar at an odd offset): canonical; the receiver copies
    header = (key + b"\x00") * padding + key  # an empty occurrence: the key and length 0
    _put_raw_varint(header, fixed + len(shape))
    header += dtype
    header += shape
    header += data_key
    parts.append(header)
    if size:
        parts.append(data)
    if location:
        parts.append(location)
    return offset + len(header) + size + len(location)


def _location(location: SharedMemoryLocation) -> bytearray:
    """The body of a SharedMemoryLocation message (proto3: zero fields left out)."""
    out = bytearray()
    if location.region:
        _put_bytes(out, 1, location.region.encode("utf-8"))
    if location.offset:
        _put_varint(out, 2 << 3 | VARINT, location.offset)
    if location.byte_size:
        _put_varint(out, 3 << 3 | VARINT, location.byte_size)
    return out


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _shape_field(shape: tuple[int, ...], unpacked: int) -> bytearray:
    """The shape field(s): the first ``unpacked`` dimensions one field each, then the rest
    packed into one field (protobuf's canonical form when ``unpacked`` is 0)."""
    out = bytearray()
    for dim in shape[:unpacked]:
        _put_varint(out, 2 << 3 | VARINT, dim)
    if shape[unpacked:]:
        packed = bytearray()
        for dim in shape[unpacked:]:
            _put_raw_varint(packed, dim)
        _put_bytes(out, 2, packed)
    return out


def _put_raw_varint(out: bytearray, value: int) -> None:
    if 0 <= value < 0x80:  # most varints here are one byte
        out.append(value)
        return
    value = int(value) & MASK64  # negative int32/int64 values take 10 bytes, as in protobuf
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _put_varint(out: bytearray, tag: int, value: int) -> None:
    out.append(tag)  # every field number here is below 16: one-byte tags
    _put_raw_varint(out, value)


def _put_bytes(out: bytearray, number: int, value: Buffer) -> None:
    out.append(number << 3 | LEN)
    _put_raw_varint(out, len(value))
    out += value


def _put_double(out: bytearray, number: int, value: float) -> None:
    packed = _DOUBLE.pack(value)
    if packed != _ZERO_DOUBLE:  # proto3 leaves out 0.0, but not -0.0
        out.append(number << 3 | I64)
        out += packed
