"""Parsing: the received bytes are walked in place; tensor data are memoryview slices."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from .._proto.lossgrad.v1 import lossgrad_pb2 as pb
from . import small
from .messages import (
    I32,
    I64,
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
    WireError,
)

_MAX_LENGTH = (1 << 31) - 1  # protobuf's limit on a length-delimited field
_MAX_STEPS = 4096  # fields and shape entries parsed in Python before handing over to C
_DOUBLE = struct.Struct("<d")

# Field number -> (name, kind). The kind fixes the wire type and how the value is read.
_REQUEST_FIELDS = {1: ("loss", "string"), 2: ("predictions", "tensor"),
                   3: ("targets", "tensor"), 4: ("sample_weight", "tensor"),
                   5: ("reduction", "int32"), 6: ("params", "message"),
                   7: ("allow_nonfinite", "bool"), 8: ("hessian", "int32"),
                   9: ("hessian_floor", "double"), 10: ("hessian_constant", "double"),
                   12: ("gradient_output", "location"), 13: ("losses_output", "location"),
                   16: ("variance", "tensor")}
_RESPONSE_FIELDS = {1: ("loss", "double"), 2: ("losses", "tensor"), 3: ("positions", "int64"),
                    4: ("positions_counted", "int64"), 5: ("weight_sum", "double"),
                    6: ("gradient", "tensor"), 7: ("hessian", "tensor"),
                    14: ("variance_gradient", "tensor")}
_STREAM_REQUEST_FIELDS = {1: ("header", "message"), 2: ("predictions", "tensor"),
                          3: ("targets", "tensor"), 4: ("sample_weight", "tensor")}
_STREAM_RESPONSE_FIELDS = {1: ("ready", "message"), 2: ("gradient", "tensor"),
                           3: ("losses", "tensor"), 4: ("summary", "message")}
_TENSOR_FIELDS = {1: ("dtype", "int32"), 2: ("shape", "shape"), 3: ("data", "bytes"),
                  4: ("shared_memory", "location")}
_LOCATION_FIELDS = {1: ("region", "string"), 2: ("offset", "int64"), 3: ("byte_size", "int64")}
_TENSOR_NAMES = {path: {number: f"{path}.{name}" for number, (name, _) in _TENSOR_FIELDS.items()}
                 for path in ("predictions", "targets", "sample_weight", "losses", "gradient",
                              "hessian", "variance", "variance_gradient")}
_WIRE_TYPES = {"string": LEN, "tensor": LEN, "message": LEN, "bytes": LEN, "shape": LEN,
               "location": LEN,
               "int32": VARINT, "int64": VARINT, "bool": VARINT, "double": I64}


class _TooManySteps(Exception):
    """The message has more fields than this parser walks in Python."""


def parse_request(data: Buffer) -> ComputeRequest:
    """Parse a ComputeLossRequest or ComputeGradientRequest; raise WireError if malformed."""
    if small.fits(data):
        parsed = small.parse_request(data)
        if parsed is not None:
            return parsed
    try:
        values = _Reader(data).message(_REQUEST_FIELDS, "request")
    except _TooManySteps:
        return small.request_of(_generated(pb.ComputeGradientRequest, data, "request"))
    if "params" in values:  # each occurrence merges into the message parsed so far
        params = pb.LossParams()
        for part in values["params"]:
            _merge(params, part, "params")
        values["params"] = params
    return ComputeRequest(**values)


def parse_response(data: Buffer) -> ComputeResponse:
    """Parse a ComputeLossResponse or ComputeGradientResponse; raise WireError if malformed."""
    if small.fits(data):
        parsed = small.parse_response(data)
        if parsed is not None:
            return parsed
    try:
        return ComputeResponse(**_Reader(data).message(_RESPONSE_FIELDS, "response"))
    except _TooManySteps:
        return small.response_of(_generated(pb.ComputeGradientResponse, data, "response"))


def parse_stream_request(data: Buffer) -> StreamRequest:
    """Parse a ComputeStreamRequest; raise WireError if malformed. Chunk data are views."""
    return StreamRequest(**_values(data, _STREAM_REQUEST_FIELDS, pb.ComputeStreamRequest,
                                   "request", (("header", pb.ComputeStreamHeader),)))


def parse_stream_response(data: Buffer) -> StreamResponse:
    """Parse a ComputeStreamResponse; raise WireError if malformed."""
    values = _values(data, _STREAM_RESPONSE_FIELDS, pb.ComputeStreamResponse, "response",
                     (("ready", pb.ComputeStreamReady), ("summary", pb.ComputeLossResponse)))
    return StreamResponse(**values)


def _merged(cls: Callable[[], Message], parts: list[memoryview], field: str) -> Any:
    """An embedded message from its occurrences (each merges into the ones before)."""
    message = cls()
    for part in parts:
        _merge(message, part, field)
    return message


def _values(data: Buffer, fields: dict[int, tuple[str, str]], cls: Callable[[], Message],
            what: str, messages: tuple[tuple[str, Callable[[], Message]], ...] = ()
            ) -> dict[str, Any]:
    """A message's fields by name, read by :class:`_Reader` with its embedded ``messages``
    (name, generated class) parsed; by the generated class ``cls`` instead when the
    message has more fields than the reader walks in Python."""
    try:
        values = _Reader(data).message(fields, what)
    except _TooManySteps:
        message = _generated(cls, data, what)
        return {name: _field(message, name) for name, _ in fields.values()}
    for name, sub in messages:
        if name in values:
            values[name] = _merged(sub, values[name], name)
    return values


def _generated(cls: Callable[[], Message], data: Buffer, field: str) -> Any:
    message = cls()
    _merge(message, data, field)
    return message


def _merge(message: Message, data: Buffer, field: str) -> None:
    try:
        message.MergeFromString(bytes(data))
    except DecodeError as err:
        raise WireError(field, f"not a valid {message.DESCRIPTOR.name}: {err}") from None


def _field(message: Any, name: str) -> Any:
    """A field of a generated message as this module represents it."""
    value = getattr(message, name)
    if not isinstance(value, Message):
        if message.DESCRIPTOR.fields_by_name[name].has_presence and not message.HasField(name):
            return None  # an ``optional`` scalar that is not set
        return value
    if not message.HasField(name):
        return None
    if isinstance(value, pb.Tensor):
        return small.tensor_of(value)
    if isinstance(value, pb.SharedMemoryLocation):
        return small.location_of(value)
    return value


class _Reader:
    """Walks the wire format of one received message; ``pos`` and ``end`` bound each
    (sub)message, so nothing is sliced until a value is taken."""

    def __init__(self, data: Buffer) -> None:
        self.view = memoryview(data).cast("B")
        self.steps = 0

    def message(self, fields: dict[int, tuple[str, str]], path: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        view = self.view
        pos, end = 0, len(view)
        while pos < end:
            number, wire_type, pos = self._tag(pos, end, path)
            spec = fields.get(number)
            if spec is None:
                pos = self._skip(pos, end, wire_type, number, path)
                continue
            name, kind = spec
            if wire_type != _WIRE_TYPES[kind]:
                raise WireError(name, f"wire type {wire_type}; expected "
                                      f"{_WIRE_TYPES[kind]} for a {kind} field")
            if kind == "tensor":
                start, pos = self._length(pos, end, name)
                values[name] = self._tensor(start, pos, name, values.get(name))
            elif kind == "location":
                start, pos = self._length(pos, end, name)
                values[name] = self._location(start, pos, name, values.get(name))
            elif kind == "message":
                start, pos = self._length(pos, end, name)
                values.setdefault(name, []).append(view[start:pos])
            elif kind == "string":
                start, pos = self._length(pos, end, name)
                try:
                    values[name] = str(view[start:pos], "utf-8")
                except UnicodeDecodeError as err:
                    raise WireError(name, f"not valid UTF-8: {err.reason} at byte "
                                          f"{start + err.start}") from None
            elif kind == "double":
                if end - pos < 8:
                    raise WireError(name, f"truncated double at byte {pos}")
                values[name] = _DOUBLE.unpack_from(view, pos)[0]
                pos += 8
            else:
                value, pos = self._varint(pos, end, name)
                values[name] = _convert_varint(value, kind)
        return values

    def _tensor(self, pos: int, end: int, path: str, merged: Tensor | None) -> Tensor:
        """Parse a Tensor; a second occurrence of the field merges into the first."""
        dtype, shape, data, location = (0, [], b"", None) if merged is None else (
            merged.dtype, list(merged.shape), merged.data, merged.shared_memory)
        names = _TENSOR_NAMES[path]
        while pos < end:
            number, wire_type, pos = self._tag(pos, end, path)
            spec = _TENSOR_FIELDS.get(number)
            if spec is None:
                pos = self._skip(pos, end, wire_type, number, path)
                continue
            name = names[number]
            if number == 2 and wire_type == VARINT:  # one unpacked shape entry
                value, pos = self._varint(pos, end, name)
                shape.append(_convert_varint(value, "int64"))
                continue
            if wire_type != _WIRE_TYPES[spec[1]]:
                raise WireError(name, f"wire type {wire_type}; expected "
                                      f"{_WIRE_TYPES[spec[1]]} for a {spec[1]} field")
            if number == 1:
                value, pos = self._varint(pos, end, name)
                dtype = _convert_varint(value, "int32")
                continue
            start, pos = self._length(pos, end, name)
            if number == 3:
                data = self.view[start:pos]
                continue
            if number == 4:
                location = self._location(start, pos, name, location)
                continue
            while start < pos:  # packed shape entries
                self._step()
                value, start = self._varint(start, pos, name)
                shape.append(_convert_varint(value, "int64"))
        return Tensor(dtype, tuple(shape), data, location)

    def _location(self, pos: int, end: int, path: str,
                  merged: SharedMemoryLocation | None) -> SharedMemoryLocation:
        """Parse a SharedMemoryLocation; a second occurrence merges into the first."""
        values: dict[str, Any] = {} if merged is None else {
            "region": merged.region, "offset": merged.offset, "byte_size": merged.byte_size}
        while pos < end:
            number, wire_type, pos = self._tag(pos, end, path)
            spec = _LOCATION_FIELDS.get(number)
            if spec is None:
                pos = self._skip(pos, end, wire_type, number, path)
                continue
            name = f"{path}.{spec[0]}"
            if wire_type != _WIRE_TYPES[spec[1]]:
                raise WireError(name, f"wire type {wire_type}; expected "
                                      f"{_WIRE_TYPES[spec[1]]} for a {spec[1]} field")
            if number == 1:
                start, pos = self._length(pos, end, name)
                try:
                    values["region"] = str(self.view[start:pos], "utf-8")
                except UnicodeDecodeError as err:
                    raise WireError(name, f"not valid UTF-8: {err.reason} at byte "
                                          f"{start + err.start}") from None
            else:
                value, pos = self._varint(pos, end, name)
                values[spec[0]] = _convert_varint(value, "int64")
        return SharedMemoryLocation(**values)

    def _step(self) -> None:
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise _TooManySteps

    def _varint(self, pos: int, end: int, field: str, max_bytes: int = 10) -> tuple[int, int]:
        view = self.view
        if pos + 1 < end:  # most varints here are one or two bytes
            value = view[pos]
            if value < 0x80:
                return value, pos + 1
            second = view[pos + 1]
            if second < 0x80:
                return value & 0x7F | second << 7, pos + 2
        value = shift = 0
        for i in range(pos, min(end, pos + max_bytes)):
            byte = view[i]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value & MASK64, i + 1
            shift += 7
        if end - pos < max_bytes:
            raise WireError(field, f"truncated varint at byte {pos}")
        raise WireError(field, f"varint at byte {pos} is longer than {max_bytes} bytes")

    def _tag(self, pos: int, end: int, path: str) -> tuple[int, int, int]:
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise _TooManySteps
        tag = self.view[pos]  # pos < end: the loops check
        if 8 <= tag < 0x80:  # a one-byte tag (field numbers 1 to 15)
            return tag >> 3, tag & 7, pos + 1
        tag, after = self._varint(pos, end, path, max_bytes=5)
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or tag >> 32:
            raise WireError(path, f"invalid tag {tag} at byte {pos}")
        return number, wire_type, after

    def _length(self, pos: int, end: int, field: str) -> tuple[int, int]:
        """Read a length prefix; return where the value starts and where it ends."""
        if pos < end and self.view[pos] < 0x80 and self.view[pos] < end - pos:
            return pos + 1, pos + 1 + self.view[pos]  # a short field that fits
        length, start = self._varint(pos, end, field, max_bytes=5)
        if length > _MAX_LENGTH or length > end - start:
            raise WireError(field, f"length {length} at byte {pos} exceeds the "
                                   f"{end - start} bytes left")
        return start, start + length

    def _skip(self, pos: int, end: int, wire_type: int, number: int, path: str) -> int:
        field = f"{path} (unknown field {number})"
        if wire_type == VARINT:
            return self._varint(pos, end, field)[1]
        if wire_type == LEN:
            return self._length(pos, end, field)[1]
        size = {I64: 8, I32: 4}.get(wire_type)
        if size is None:
            what = "groups are not supported" if wire_type in (3, 4) else "invalid"
            raise WireError(field, f"wire type {wire_type} at byte {pos}: {what}")
        if end - pos < size:
            raise WireError(field, f"truncated {size}-byte value at byte {pos}")
        return pos + size


def _convert_varint(value: int, kind: str) -> int | bool:
    """A varint's 64 bits as the field's type: int32 (enums) and int64 are two's complement."""
    if value < 0x80000000 and kind != "bool":
        return value
    if kind == "bool":
        return value != 0
    if kind == "int32":
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >> 31 else value
    return value - (1 << 64) if value >> 63 else value
