"""The hand-written codec of the Compute* messages against the generated protobuf classes.

Property tests over random messages (fixed seeds): what ``_wire`` parses equals what the
generated classes parse from the same bytes, in whatever layout a conforming encoder may
choose (field order, unknown fields, repeated fields, packed or unpacked shapes, overlong
varints); what ``_wire`` serializes is byte-identical to
``SerializeToString(deterministic=True)``. Malformed bytes raise WireError, nothing else.
The bytes of the random layouts are written by a small encoder in this file, apart from
the codec under test.

Messages of up to 64 KiB go through the generated classes (``_wire.small``) and larger ones
through the hand-written walk, so every test here runs both ways: as the codec is
(``small``), and with the generated path turned off (``walk``), whatever the size.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from lossgrad_client import _wire
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._wire import small

MASK64 = (1 << 64) - 1
REQUEST_SCHEMA = {1: "string", 2: "tensor", 3: "tensor", 4: "tensor", 5: "enum", 6: "params",
                  7: "bool", 8: "enum", 9: "optional_double", 10: "optional_double",
                  12: "location", 13: "location", 16: "tensor"}
RESPONSE_SCHEMA = {1: "double", 2: "tensor", 3: "int64", 4: "int64", 5: "double", 6: "tensor",
                   7: "tensor", 14: "tensor"}
HESSIAN_SCALARS = ("hessian_floor", "hessian_constant")
PARAM_FIELDS = ("delta", "from_logits", "pos_weight", "label_smoothing", "ignore_index",
                "log_predictions", "beta", "quantile", "log_input", "full", "power", "alpha",
                "gamma")
BOOL_PARAMS = ("from_logits", "log_predictions", "log_input", "full")
REQUEST_TENSORS = ("predictions", "targets", "sample_weight", "variance")
RESPONSE_TENSORS = ("losses", "gradient", "hessian", "variance_gradient")



@pytest.fixture(autouse=True, params=["small", "walk"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``small``: the codec as it is; ``walk``: every message through the hand-written code."""
    if request.param == "walk":
        monkeypatch.setattr(small, "SMALL_MESSAGE_BYTES", -1)
    return str(request.param)


# --- an independent encoder for arbitrary layouts ------------------------------------------

def varint(value: int, overlong: int = 0) -> bytes:
    """``value``'s varint (two's complement for negatives), padded with ``overlong``
    redundant continuation bytes (at most 10 bytes in all)."""
    value &= MASK64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    for _ in range(min(overlong, 10 - len(out))):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_field(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def varint_field(number: int, value: int, overlong: int = 0) -> bytes:
    return key(number, 0) + varint(value, overlong)


def unknown_field(rng: random.Random, known: set[int]) -> bytes:
    number = rng.choice([n for n in (8, 9, 15, 16, 17, 100, 2047, 2**29 - 1)
                         if n not in known])
    wire_type = rng.choice([0, 1, 2, 5])
    if wire_type == 0:
        return varint_field(number, rng.getrandbits(64), rng.randrange(3))
    if wire_type == 2:
        return length_field(number, rng.randbytes(rng.randrange(12)))
    return key(number, wire_type) + rng.randbytes(8 if wire_type == 1 else 4)


# --- random field values --------------------------------------------------------------------

def random_text(rng: random.Random) -> str:
    alphabet = "mse_huberλ交\U0001f600 \x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))


def random_int(rng: random.Random, bits: int) -> int:
    """Mostly small; sometimes negative, or near the ends of the signed range."""
    return rng.choice([0, 1, 2, 3, 4, 7, 42, 127, 128, 300, -1, -5,
                       -(1 << (bits - 1)), (1 << (bits - 1)) - 1, rng.getrandbits(bits - 1)])


def random_double(rng: random.Random) -> float:
    return rng.choice([0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan, 5e-324,
                       rng.uniform(-1e6, 1e6)])


def random_tensor_fields(rng: random.Random) -> dict[str, Any]:
    ndim = rng.choice([0, 0, 1, 1, 2, 3, 4])
    shape = [rng.choice([0, 1, 2, 3, 5, 128, 2**40, -1, -(2**63)]) for _ in range(ndim)]
    fields = {"dtype": rng.choice([0, 1, 2, 3, 4, 1, 2, 42, -1]), "shape": shape,
              "data": rng.randbytes(rng.choice([0, 1, 4, 8, 24, 200]))}
    if rng.random() < 0.3:
        fields["shared_memory"] = random_location(rng)
    return fields


def random_location(rng: random.Random) -> pb.SharedMemoryLocation:
    return pb.SharedMemoryLocation(region=random_text(rng), offset=random_int(rng, 64),
                                   byte_size=random_int(rng, 64))


def random_params(rng: random.Random) -> pb.LossParams:
    params = pb.LossParams()
    for name in rng.sample(PARAM_FIELDS, rng.randrange(len(PARAM_FIELDS) + 1)):
        if name in BOOL_PARAMS:
            setattr(params, name, rng.random() < 0.5)
        elif name == "ignore_index":
            setattr(params, name, random_int(rng, 64))
        else:
            setattr(params, name, random_double(rng))
    if rng.random() < 0.3:
        params.class_weight.extend(rng.uniform(0, 3) for _ in range(rng.randrange(4)))
    return params


def random_request(rng: random.Random) -> pb.ComputeGradientRequest:
    message = pb.ComputeGradientRequest()
    if rng.random() < 0.8:
        message.loss = random_text(rng)
    for name in REQUEST_TENSORS:
        if rng.random() < 0.7:
            getattr(message, name).SetInParent()
            for field, value in random_tensor_fields(rng).items():
                if field == "shape":
                    getattr(message, name).shape.extend(value)
                elif field == "shared_memory":
                    getattr(message, name).shared_memory.CopyFrom(value)
                else:
                    setattr(getattr(message, name), field, value)
    if rng.random() < 0.6:
        message.reduction = random_int(rng, 32)  # type: ignore[assignment]
    if rng.random() < 0.5:
        message.params.CopyFrom(random_params(rng))
    if rng.random() < 0.5:
        message.allow_nonfinite = rng.random() < 0.7
    if rng.random() < 0.4:
        message.hessian = random_int(rng, 32)  # type: ignore[assignment]
    for name in HESSIAN_SCALARS:
        if rng.random() < 0.3:
            setattr(message, name, random_double(rng))
    for name in ("gradient_output", "losses_output"):
        if rng.random() < 0.3:
            getattr(message, name).CopyFrom(random_location(rng))
    return message


def random_response(rng: random.Random) -> pb.ComputeGradientResponse:
    message = pb.ComputeGradientResponse(
        loss=random_double(rng), positions=random_int(rng, 64),
        positions_counted=random_int(rng, 64), weight_sum=random_double(rng))
    for name in RESPONSE_TENSORS:
        if rng.random() < 0.6:
            fields = random_tensor_fields(rng)
            getattr(message, name).CopyFrom(pb.Tensor(**fields))
    return message


# --- random layouts of the same kind of message -------------------------------------------

def tensor_layout(rng: random.Random, fields: dict[str, Any]) -> bytes:
    """A Tensor body in a random layout: fields in any order, each scalar maybe twice (the
    last wins), the shape split into packed runs and unpacked entries (in order), unknown
    fields."""
    chunks: list[bytes] = []
    if fields["dtype"] or rng.random() < 0.3:
        if rng.random() < 0.2:
            chunks.append(varint_field(1, random_int(rng, 32)))  # overwritten below
        chunks.append(varint_field(1, fields["dtype"], rng.randrange(3)))
    shape = fields["shape"]
    i = 0
    while i < len(shape):
        run = rng.randint(1, len(shape) - i)
        if rng.random() < 0.5:
            chunks.append(length_field(2, b"".join(varint(d, rng.randrange(2))
                                                   for d in shape[i:i + run])))
        else:
            chunks += [varint_field(2, d) for d in shape[i:i + run]]
        i += run
    if fields["data"] or rng.random() < 0.3:
        if rng.random() < 0.2:
            chunks.append(length_field(3, rng.randbytes(5)))  # overwritten below
        chunks.append(length_field(3, fields["data"]))
    if "shared_memory" in fields:
        chunks.append(length_field(4, location_layout(rng, fields["shared_memory"])))
    _interleave(rng, chunks)
    for _ in range(rng.randrange(3)):
        chunks.insert(rng.randrange(len(chunks) + 1), unknown_field(rng, {1, 2, 3, 4}))
    return b"".join(chunks)


def location_layout(rng: random.Random, location: pb.SharedMemoryLocation) -> bytes:
    """A SharedMemoryLocation body in a random layout (see :func:`tensor_layout`)."""
    chunks: list[bytes] = []
    if location.region or rng.random() < 0.3:
        if rng.random() < 0.2:
            chunks.append(length_field(1, b"overwritten"))
        chunks.append(length_field(1, location.region.encode()))
    for number, value in ((2, location.offset), (3, location.byte_size)):
        if value or rng.random() < 0.3:
            if rng.random() < 0.2:
                chunks.append(varint_field(number, 7))  # overwritten below
            chunks.append(varint_field(number, value, rng.randrange(3)))
    _interleave(rng, chunks)
    for _ in range(rng.randrange(2)):
        chunks.insert(rng.randrange(len(chunks) + 1), unknown_field(rng, {1, 2, 3}))
    return b"".join(chunks)


def message_layout(rng: random.Random, message: Any, schema: dict[int, str]) -> bytes:
    """``message`` encoded in a random but valid layout (see :func:`tensor_layout`); the
    generated classes parse it to ``message``."""
    chunks: list[bytes] = []
    names = {f.number: f.name for f in message.DESCRIPTOR.fields}
    for number, kind in schema.items():
        name = names[number]
        value = getattr(message, name)
        if kind == "tensor":
            if message.HasField(name):
                fields = {"dtype": value.dtype, "shape": list(value.shape), "data": value.data}
                if value.HasField("shared_memory"):
                    fields["shared_memory"] = value.shared_memory
                body = tensor_layout(rng, fields)
                cut = rng.randrange(len(body) + 1) if rng.random() < 0.3 else len(body)
                # A message field sent in two pieces: protobuf merges them.
                chunks.append(length_field(number, body[:cut]))
                if cut < len(body) and _splits_cleanly(body, cut):
                    chunks.append(length_field(number, body[cut:]))
                else:
                    chunks[-1] = length_field(number, body)
        elif kind == "location":
            if message.HasField(name):
                chunks.append(length_field(number, location_layout(rng, value)))
        elif kind == "params":
            if message.HasField(name):
                chunks.append(length_field(number, value.SerializeToString()))
        elif kind == "string":
            if value or rng.random() < 0.2:
                if rng.random() < 0.2:
                    chunks.append(length_field(number, b"overwritten"))
                chunks.append(length_field(number, value.encode()))
        elif kind == "double":
            if struct.pack("<d", value) != bytes(8) or rng.random() < 0.2:
                chunks.append(key(number, 1) + struct.pack("<d", value))
        elif kind == "optional_double":
            if message.HasField(name):
                if rng.random() < 0.2:
                    chunks.append(key(number, 1) + struct.pack("<d", 7.0))  # overwritten below
                chunks.append(key(number, 1) + struct.pack("<d", value))
        elif value or rng.random() < 0.2:
            if rng.random() < 0.2:
                chunks.append(varint_field(number, 1))  # overwritten below
            chunks.append(varint_field(number, int(value), rng.randrange(3)))
    _interleave(rng, chunks)
    for _ in range(rng.randrange(4)):
        chunks.insert(rng.randrange(len(chunks) + 1), unknown_field(rng, set(schema)))
    return b"".join(chunks)


def _splits_cleanly(body: bytes, cut: int) -> bool:
    """Whether ``cut`` falls between two fields of ``body`` (both halves parse)."""
    try:
        pb.Tensor.FromString(body[:cut])
        pb.Tensor.FromString(body[cut:])
    except DecodeError:
        return False
    return True


def _field_number(chunk: bytes) -> int:
    tag = 0
    for i, byte in enumerate(chunk[:5]):
        tag |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            break
    return tag >> 3


def _interleave(rng: random.Random, chunks: list[bytes]) -> None:
    """Reorder ``chunks`` at random while keeping the relative order of each field's
    occurrences (so the last occurrence stays last)."""
    by_field: dict[int, list[bytes]] = {}
    for chunk in chunks:
        by_field.setdefault(_field_number(chunk), []).append(chunk)
    order = [n for n, group in by_field.items() for _ in group]
    rng.shuffle(order)
    chunks[:] = [by_field[n].pop(0) for n in order]


# --- comparing with the generated classes ---------------------------------------------------

TensorFields = tuple[int, tuple[int, ...], bytes, "tuple[str, int, int] | None"]


def location_of(message: Any, name: str) -> tuple[str, int, int] | None:
    if not message.HasField(name):
        return None
    location = getattr(message, name)
    return location.region, location.offset, location.byte_size


def parsed_location(location: _wire.SharedMemoryLocation | None) -> tuple[str, int, int] | None:
    return None if location is None else (location.region, location.offset, location.byte_size)


def tensor_of(message: Any, name: str) -> TensorFields | None:
    if not message.HasField(name):
        return None
    tensor = getattr(message, name)
    return (tensor.dtype, tuple(tensor.shape), tensor.data,
            location_of(tensor, "shared_memory"))


def parsed_tensor(tensor: _wire.Tensor | None) -> TensorFields | None:
    return None if tensor is None else (tensor.dtype, tensor.shape, bytes(tensor.data),
                                        parsed_location(tensor.shared_memory))


def wire_tensor(fields: TensorFields | None) -> _wire.Tensor | None:
    if fields is None:
        return None
    location = None if fields[3] is None else _wire.SharedMemoryLocation(*fields[3])
    return _wire.Tensor(fields[0], fields[1], fields[2], location)


def assert_request_equal(parsed: _wire.ComputeRequest, message: pb.ComputeGradientRequest) -> None:
    assert parsed.loss == message.loss
    for name in REQUEST_TENSORS:
        assert parsed_tensor(getattr(parsed, name)) == tensor_of(message, name), name
    assert parsed.reduction == message.reduction
    assert parsed.allow_nonfinite is message.allow_nonfinite
    assert parsed.hessian == message.hessian
    for name in HESSIAN_SCALARS:  # bitwise, and None exactly when not set
        expected = struct.pack("<d", getattr(message, name)) if message.HasField(name) else None
        value = getattr(parsed, name)
        assert (None if value is None else struct.pack("<d", value)) == expected, name
    for name in ("gradient_output", "losses_output"):
        assert parsed_location(getattr(parsed, name)) == location_of(message, name), name
    if message.HasField("params"):
        assert parsed.params is not None
        assert parsed.params.SerializeToString(deterministic=True) == \
            message.params.SerializeToString(deterministic=True)
    else:
        assert parsed.params is None


def assert_response_equal(parsed: _wire.ComputeResponse,
                          message: pb.ComputeGradientResponse) -> None:
    for name in ("loss", "weight_sum"):  # bitwise: -0.0 and NaN payloads included
        assert struct.pack("<d", getattr(parsed, name)) == struct.pack("<d", getattr(message, name))
    assert (parsed.positions, parsed.positions_counted) == \
        (message.positions, message.positions_counted)
    for name in RESPONSE_TENSORS:
        assert parsed_tensor(getattr(parsed, name)) == tensor_of(message, name), name


def to_wire_request(message: pb.ComputeGradientRequest) -> _wire.ComputeRequest:
    def tensor(name: str) -> _wire.Tensor | None:
        return wire_tensor(tensor_of(message, name))

    def location(name: str) -> _wire.SharedMemoryLocation | None:
        got = location_of(message, name)
        return None if got is None else _wire.SharedMemoryLocation(*got)

    return _wire.ComputeRequest(
        loss=message.loss, predictions=tensor("predictions"), targets=tensor("targets"),
        sample_weight=tensor("sample_weight"), reduction=message.reduction,
        params=message.params if message.HasField("params") else None,
        allow_nonfinite=message.allow_nonfinite, hessian=message.hessian,
        gradient_output=location("gradient_output"), losses_output=location("losses_output"),
        variance=tensor("variance"),
        **{name: getattr(message, name) for name in HESSIAN_SCALARS if message.HasField(name)})


def to_wire_response(message: pb.ComputeGradientResponse) -> _wire.ComputeResponse:
    def tensor(name: str) -> _wire.Tensor | None:
        return wire_tensor(tensor_of(message, name))

    return _wire.ComputeResponse(
        loss=message.loss, losses=tensor("losses"), positions=message.positions,
        positions_counted=message.positions_counted, weight_sum=message.weight_sum,
        gradient=tensor("gradient"), hessian=tensor("hessian"),
        variance_gradient=tensor("variance_gradient"))


# --- parsing: same result as the generated classes -----------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_parse_canonical_requests(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        message = random_request(rng)
        data = message.SerializeToString()
        assert_request_equal(_wire.parse_request(data), message)


@pytest.mark.parametrize("seed", range(4))
def test_parse_requests_in_any_layout(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(300):
        data = message_layout(rng, random_request(rng), REQUEST_SCHEMA)
        assert_request_equal(_wire.parse_request(data), pb.ComputeGradientRequest.FromString(data))


@pytest.mark.parametrize("seed", range(4))
def test_parse_merged_requests(seed: int) -> None:
    """Two messages back to back are one: scalars from the second, tensors and params merged."""
    rng = random.Random(200 + seed)
    for _ in range(200):
        data = b"".join(message_layout(rng, random_request(rng), REQUEST_SCHEMA)
                        for _ in range(rng.randint(2, 3)))
        assert_request_equal(_wire.parse_request(data), pb.ComputeGradientRequest.FromString(data))


@pytest.mark.parametrize("seed", range(4))
def test_parse_responses_in_any_layout(seed: int) -> None:
    rng = random.Random(300 + seed)
    for _ in range(300):
        message = random_response(rng)
        for data in (message.SerializeToString(),
                     message_layout(rng, message, RESPONSE_SCHEMA),
                     message_layout(rng, message, RESPONSE_SCHEMA)
                     + message_layout(rng, random_response(rng), RESPONSE_SCHEMA)):
            assert_response_equal(_wire.parse_response(data),
                                  pb.ComputeGradientResponse.FromString(data))


@pytest.mark.parametrize("codec", ["walk"], indirect=True)
def test_tensor_data_is_a_view_of_the_message() -> None:
    data = pb.ComputeGradientRequest(
        loss="mse", predictions=pb.Tensor(dtype=1, shape=[3], data=b"a" * 12)).SerializeToString()
    parsed = _wire.parse_request(data)
    assert parsed.predictions is not None
    view = parsed.predictions.data
    assert isinstance(view, memoryview) and view.obj is data
    response = pb.ComputeGradientResponse(gradient=pb.Tensor(dtype=2, shape=[1], data=b"b" * 8))
    out = response.SerializeToString()
    gradient = _wire.parse_response(out).gradient
    assert gradient is not None
    assert isinstance(gradient.data, memoryview) and gradient.data.obj is out


@pytest.mark.parametrize("codec", ["small"], indirect=True)
def test_small_messages_go_through_the_generated_classes_large_ones_are_walked() -> None:
    """Up to 64 KiB of tensors: canonical bytes, parsed into bytes of their own (aligned,
    as CPython's bytes are). Above: the aligned layout, parsed into views of the message."""
    for elements, is_small in ((1000, True), (small.SMALL_MESSAGE_BYTES // 8 - 128, True),
                               (small.SMALL_MESSAGE_BYTES // 8, False)):
        x = np.arange(elements, dtype=np.float32)
        request = _wire.ComputeRequest(loss="mse", predictions=_wire.Tensor.of(x),
                                       targets=_wire.Tensor.of(x))
        data = _wire.serialize_request(request)
        assert (data == _wire.serialize_request(request, align=False)) is is_small
        parsed = _wire.parse_request(data)
        assert parsed.predictions is not None
        assert isinstance(parsed.predictions.data, memoryview) is not is_small
        assert np.array_equal(np.frombuffer(parsed.predictions.data, np.float32), x)
        response = _wire.ComputeResponse(loss=1.5, positions=elements,
                                         gradient=_wire.Tensor.of(np.ones(elements)))
        out = _wire.serialize_response(response)
        gradient = _wire.parse_response(out).gradient
        assert gradient is not None and bytes(gradient.data) == np.ones(elements).tobytes()
        assert isinstance(gradient.data, memoryview) is not is_small


@pytest.mark.parametrize("codec", ["small"], indirect=True)
@pytest.mark.parametrize(("data", "field"), [
    (b"\x0a\x03mse\x58\x01", None),  # field 11, not in the schema: skipped
    (b"\x0a\x03mse\x12\x04\x1a\x00\x78\x01", None),  # an unknown field in a tensor
    (b"\x62\x02\x78\x01", None),  # and in a location
    (b"\x08\x01", "loss"),  # loss, a string, sent as a varint
    (b"\x12\x02\x08\x80", "predictions.dtype"),  # truncated
], ids=["unknown", "unknown-in-tensor", "unknown-in-location", "wrong-wire-type", "truncated"])
def test_the_walk_decides_what_the_generated_parser_does_not_know(data: bytes,
                                                                  field: str | None) -> None:
    """A small message with fields the generated class does not know (a known field with
    the wrong wire type among them), or that it refuses, goes to the walk, which skips
    the unknown fields and names the field of anything malformed."""
    assert small.parse_request(data) is None
    if field is None:
        assert_request_equal(_wire.parse_request(data), pb.ComputeGradientRequest.FromString(data))
    else:
        with pytest.raises(_wire.WireError) as err:
            _wire.parse_request(data)
        assert err.value.field == field
    assert small.parse_response(b"\x58\x01") is None
    assert _wire.parse_response(b"\x58\x01").loss == 0.0


@pytest.mark.parametrize("codec", ["small"], indirect=True)
def test_values_the_generated_classes_refuse_are_written_by_the_walk() -> None:
    """A value out of its field's range (the hand-written encoder wraps it, as protobuf
    wraps what it reads) is written, not refused."""
    response = _wire.ComputeResponse(loss=1.0, positions=1 << 64 | 5)
    assert small.serialize_response(response) is None
    assert _wire.parse_response(_wire.serialize_response(response)).positions == 5
    request = _wire.ComputeRequest(loss="mse", reduction=(1 << 32) + 2)
    assert small.serialize_request(request) is None
    assert _wire.parse_request(_wire.serialize_request(request)).reduction == 2


def test_a_canonical_small_response_read_by_the_walk_is_aligned() -> None:
    """The client's arrays are aligned whichever way the response went: a walk of a
    canonical response (a server's small responses are canonical) copies what it must."""
    from lossgrad_client._convert import from_tensor

    for shape in ((1,), (3, 5), (1000,)):
        gradient = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
        data = pb.ComputeGradientResponse(loss=1.5, gradient=pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT64, shape=shape, data=gradient.tobytes())).SerializeToString()
        array = from_tensor(_wire.parse_response(data + b"\x58\x01").gradient, "gradient")
        assert array.flags.aligned and not array.flags.writeable
        assert np.array_equal(array, gradient)


def test_parse_accepts_bytearray_and_memoryview() -> None:
    message = random_request(random.Random(7))
    data = message.SerializeToString()
    for given in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert_request_equal(_wire.parse_request(given), message)


def test_many_fields_go_to_the_generated_parser() -> None:
    """Past the step budget the generated (C) parser takes over, with the same result."""
    rng = random.Random(8)
    message = random_request(rng)
    message.predictions.shape.extend(range(10_000))
    padding = b"".join(varint_field(11, i) for i in range(10_000))
    for data in (message.SerializeToString(), padding + message.SerializeToString()):
        assert_request_equal(_wire.parse_request(data), pb.ComputeGradientRequest.FromString(data))
    response = pb.ComputeGradientResponse(loss=1.5, gradient=pb.Tensor(dtype=1, shape=[1] * 5000))
    data = padding + response.SerializeToString()
    assert_response_equal(_wire.parse_response(data), pb.ComputeGradientResponse.FromString(data))
    with pytest.raises(_wire.WireError, match="request: not a valid ComputeGradientRequest"):
        _wire.parse_request(padding + b"\x0a\x05abc")


def test_parse_a_large_message_quickly() -> None:
    big = np.arange(4_000_000, dtype=np.float32)
    data = pb.ComputeGradientRequest(
        loss="mse", predictions=pb.Tensor(dtype=1, shape=[big.size], data=big.tobytes()),
        targets=pb.Tensor(dtype=1, shape=[big.size], data=big.tobytes())).SerializeToString()
    parsed = _wire.parse_request(data)
    assert parsed.targets is not None
    assert np.array_equal(np.frombuffer(parsed.targets.data, np.float32), big)


# --- serializing: the bytes of SerializeToString(deterministic=True), or aligned ---------------

def data_offsets(data: bytes, parsed: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Where each parsed tensor's data starts in ``data``."""
    base = np.frombuffer(data, np.uint8).ctypes.data
    offsets = {}
    for name in names:
        tensor = getattr(parsed, name)
        if tensor is not None and len(tensor.data):
            offsets[name] = np.frombuffer(tensor.data, np.uint8).ctypes.data - base
    return offsets


def assert_aligned(data: bytes, parsed: Any, names: tuple[str, ...]) -> None:
    """Every tensor of a known dtype and more than a scalar starts at a multiple of its
    item size (a scalar may not: the encoder only has even paddings for it)."""
    for name, offset in data_offsets(data, parsed, names).items():
        tensor = getattr(parsed, name)
        itemsize = _wire.LITTLE_ENDIAN[tensor.dtype].itemsize if tensor.dtype in \
            _wire.LITTLE_ENDIAN else 1
        assert offset % itemsize == 0 or not tensor.shape, (name, offset, tensor.shape)


@pytest.mark.parametrize("seed", range(4))
def test_serialize_requests_like_protobuf(seed: int) -> None:
    rng = random.Random(400 + seed)
    for _ in range(300):
        message = random_request(rng)
        canonical = message.SerializeToString(deterministic=True)
        assert _wire.serialize_request(to_wire_request(message), align=False) == canonical
        data = _wire.serialize_request(to_wire_request(message))
        parsed = _wire.parse_request(data)
        assert_request_equal(parsed, message)
        assert_request_equal(parsed, pb.ComputeGradientRequest.FromString(data))
        assert_aligned(data, parsed, REQUEST_TENSORS)


@pytest.mark.parametrize("seed", range(4))
def test_serialize_responses_like_protobuf(seed: int) -> None:
    rng = random.Random(500 + seed)
    for _ in range(300):
        message = random_response(rng)
        canonical = message.SerializeToString(deterministic=True)
        assert _wire.serialize_response(to_wire_response(message), align=False) == canonical
        data = _wire.serialize_response(to_wire_response(message))
        parsed = _wire.parse_response(data)
        assert_response_equal(parsed, message)
        assert_response_equal(parsed, pb.ComputeGradientResponse.FromString(data))
        assert_aligned(data, parsed, RESPONSE_TENSORS)


@pytest.mark.parametrize("seed", range(2))
def test_requests_the_client_sends_are_aligned(seed: int) -> None:
    """Real arrays: every tensor's data lands on its item size, and the bytes differ from
    the canonical ones only where that takes it."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(d) for d in rng.choice([1, 2, 3, 7, 100, 1000, 70000], ndim))
        if math.prod(shape) > 2_000_000:
            continue
        x = np.zeros(shape, rng.choice([np.float32, np.float64]))
        t = np.zeros(shape[:-1], rng.choice([np.int32, np.int64]))
        w = np.ones(shape[:1], x.dtype)
        request = _wire.ComputeRequest(
            loss="sparse_categorical_cross_entropy"[:int(rng.integers(0, 33))],
            predictions=_wire.Tensor.of(x), targets=_wire.Tensor.of(t),
            sample_weight=_wire.Tensor.of(w) if rng.random() < 0.5 else None,
            reduction=int(rng.integers(0, 4)), allow_nonfinite=bool(rng.random() < 0.5),
            variance=_wire.Tensor.of(np.ones(shape, x.dtype)) if rng.random() < 0.3 else None)
        data = _wire.serialize_request(request)
        parsed = _wire.parse_request(data)
        assert_aligned(data, parsed, REQUEST_TENSORS)
        message = pb.ComputeGradientRequest.FromString(data)
        assert message.SerializeToString(deterministic=True) == \
            _wire.serialize_request(request, align=False)
        # At most 3 empty occurrences of 2 bytes (7 of 3 bytes for the variance's two-byte
        # key) and one byte of shape layout per tensor.
        assert len(data) - len(message.SerializeToString()) <= 3 * (3 * 2 + 1) + 7 * 3 + 1


def test_aligned_response_arrays_through_the_client_conversion() -> None:
    gradient = np.arange(15, dtype=np.float64).reshape(5, 3)
    for loss in (0.0, 1.5):
        data = _wire.serialize_response(_wire.ComputeResponse(
            loss=loss, positions=5, positions_counted=3, weight_sum=5.0,
            gradient=_wire.Tensor.of(gradient)))
        parsed = _wire.parse_response(data)
        assert parsed.gradient is not None
        array = np.frombuffer(parsed.gradient.data, np.float64).reshape(parsed.gradient.shape)
        assert array.flags.aligned
        assert np.array_equal(array, gradient)


@pytest.mark.parametrize("array", [
    np.float64(2.5), np.zeros((0, 3), np.float32), np.arange(12, dtype=np.int32).reshape(3, 4),
    np.arange(12, dtype=">f8").reshape(3, 4), np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],
    np.asfortranarray(np.ones((3, 2), np.float32)),
], ids=["0-d", "empty", "int32", "big-endian", "strided", "fortran"])
def test_tensor_of_arrays(array: np.ndarray) -> None:
    tensor = _wire.Tensor.of(array)
    response = pb.ComputeGradientResponse.FromString(
        _wire.serialize_response(_wire.ComputeResponse(gradient=tensor)))
    little = array.astype(array.dtype.newbyteorder("<"))
    assert response.gradient.dtype == _wire.DATA_TYPES[array.dtype.name]
    assert tuple(response.gradient.shape) == array.shape
    assert response.gradient.data == little.tobytes()


def test_tensor_of_a_contiguous_array_does_not_copy() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    view = _wire.Tensor.of(array).data
    assert isinstance(view, memoryview)
    assert np.shares_memory(np.frombuffer(view, np.float32), array)


def test_tensor_of_an_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="complex64"):
        _wire.Tensor.of(np.zeros(2, np.complex64))


# --- malformed bytes: WireError naming the field, nothing else --------------------------------

def parse_like_protobuf(data: bytes, parse: Callable[[bytes], Any], cls: Any) -> None:
    """``parse`` fails exactly when the generated parser does, and otherwise agrees with it;
    it may also refuse what only its stricter rules reject (groups, wrong wire types)."""
    try:
        expected = cls.FromString(data)
    except DecodeError:
        expected = None
    try:
        got = parse(data)
    except _wire.WireError as err:
        assert expected is None or "wire type" in str(err), (data, err)
        return
    assert expected is not None, data
    if cls is pb.ComputeGradientRequest:
        assert_request_equal(got, expected)
    else:
        assert_response_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_truncated_messages(seed: int) -> None:
    rng = random.Random(600 + seed)
    for _ in range(25):
        message = random_request(rng)
        data = message_layout(rng, message, REQUEST_SCHEMA)
        for cut in range(len(data)):
            parse_like_protobuf(data[:cut], _wire.parse_request, pb.ComputeGradientRequest)
        response = message_layout(rng, random_response(rng), RESPONSE_SCHEMA)
        for cut in range(len(response)):
            parse_like_protobuf(response[:cut], _wire.parse_response,
                                pb.ComputeGradientResponse)


@pytest.mark.parametrize("seed", range(4))
def test_corrupted_messages(seed: int) -> None:
    rng = random.Random(700 + seed)
    for _ in range(1500):
        data = bytearray(message_layout(rng, random_request(rng), REQUEST_SCHEMA))
        if not data:
            continue
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] = rng.choice([rng.randrange(256), data[i] ^ 0x80, 0xFF, 0x00])
        parse_like_protobuf(bytes(data), _wire.parse_request, pb.ComputeGradientRequest)
        parse_like_protobuf(bytes(data), _wire.parse_response, pb.ComputeGradientResponse)


@pytest.mark.parametrize(("data", "field", "words"), [
    (b"\x0a\x05ab", "loss", "length 5 at byte 1 exceeds the 2 bytes left"),
    (b"\x0a\xff\xff\xff\xff\x07", "loss", "length 2147483647"),
    (b"\x0a\x80\x80\x80\x80\x08", "loss", "length 2147483648"),
    (b"\x0a\xff\xff\xff\xff\xff\x01", "loss", "longer than 5 bytes"),
    (b"\x12\x02\x1a\x05", "predictions.data", "exceeds the 0 bytes left"),
    (b"\x28\x80\x80", "reduction", "truncated varint at byte 1"),
    (b"\x28" + b"\x80" * 10 + b"\x01", "reduction", "longer than 10 bytes"),
    (b"\x12\x03\x10\x80\x80", "predictions.shape", "truncated varint"),
    (b"\x12\x04\x12\x02\x01\x80", "predictions.shape", "truncated varint"),
    (b"\x12\x02\x12\x05", "predictions.shape", "exceeds the 0 bytes left"),
    (b"\x0a\x01\xff", "loss", "not valid UTF-8"),
    (b"\x0a\x03\xed\xa0\x80", "loss", "not valid UTF-8"),  # a UTF-16 surrogate
    (b"\x08\x05", "loss", "wire type 0; expected 2"),
    (b"\x10\x05", "predictions", "wire type 0; expected 2"),
    (b"\x2a\x00", "reduction", "wire type 2; expected 0"),
    (b"\x39" + bytes(8), "allow_nonfinite", "wire type 1; expected 0"),
    (b"\x12\x02\x0a\x00", "predictions.dtype", "wire type 2; expected 0"),
    (b"\x12\x02\x18\x00", "predictions.data", "wire type 0; expected 2"),
    (b"\x12\x05\x15\x00\x00\x00\x00", "predictions.shape", "wire type 5; expected 2"),
    (b"\x0b\x0c", "loss", "wire type 3"),
    (b"\x5b\x5c", "request (unknown field 11)", "groups are not supported"),
    (b"\x5c", "request (unknown field 11)", "groups are not supported"),
    (b"\x12\x02\x43\x44", "predictions (unknown field 8)", "groups are not supported"),
    (b"\x5e", "request (unknown field 11)", "wire type 6 at byte 1: invalid"),
    (b"\x5f", "request (unknown field 11)", "wire type 7 at byte 1: invalid"),
    (b"\x00\x01", "request", "invalid tag 0 at byte 0"),
    (b"\xf8\xff\xff\xff\x1f\x00", "request", "invalid tag"),
    (b"\x80\x80\x80\x80\x80\x01", "request", "longer than 5 bytes"),
    (b"\x5d\x00\x00\x00", "request (unknown field 11)", "truncated 4-byte value at byte 1"),
    (b"\x59\x00", "request (unknown field 11)", "truncated 8-byte value"),
    (b"\x5a\x03ab", "request (unknown field 11)", "exceeds the 2 bytes left"),
    (b"\x42\x00", "hessian", "wire type 2; expected 0"),
    (b"\x49\x00\x00", "hessian_floor", "truncated double at byte 1"),
    (b"\x50\x01", "hessian_constant", "wire type 0; expected 1"),
    (b"\x32\x02\x08\x80", "params", "not a valid LossParams"),
    (b"\x12\x02\x22\x05", "predictions.shared_memory", "exceeds the 0 bytes left"),
    (b"\x12\x04\x22\x02\x08\x01", "predictions.shared_memory.region", "wire type 0; expected 2"),
    (b"\x12\x04\x22\x02\x12\x00", "predictions.shared_memory.offset", "wire type 2; expected 0"),
    (b"\x12\x02\x20\x01", "predictions.shared_memory", "wire type 0; expected 2"),
    (b"\x62\x02\x10\x80", "gradient_output.offset", "truncated varint"),
    (b"\x6a\x03\x0a\x01\xff", "losses_output.region", "not valid UTF-8"),
    (b"\x60\x01", "gradient_output", "wire type 0; expected 2"),
    (b"\x32\x01\x0b", "params", "not a valid LossParams"),
])
def test_malformed_request(data: bytes, field: str, words: str) -> None:
    with pytest.raises(_wire.WireError) as info:
        _wire.parse_request(data)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("data", "field"), [
    (b"\x09\x00\x00", "loss"), (b"\x29" + bytes(7), "weight_sum"), (b"\x18\x80", "positions"),
    (b"\x32\x04\x08\x01\x1a\x05", "gradient.data"), (b"\x08\x01", "loss"),
])
def test_malformed_response(data: bytes, field: str) -> None:
    with pytest.raises(_wire.WireError) as info:
        _wire.parse_response(data)
    assert info.value.field == field


def test_values_wrap_like_protobuf() -> None:
    """int32 enums keep the low 32 bits, int64 the low 64, both two's complement."""
    cases = [b"\x28" + varint(-1), b"\x28\xff\xff\xff\xff\x0f", b"\x28\x85\x80\x80\x80\x10",
             b"\x38" + b"\x80" * 9 + b"\x02", b"\x12\x0b\x10" + b"\xff" * 9 + b"\x01",
             b"\x12\x0b\x10\x83" + b"\x80" * 8 + b"\x02", b"\x12\x0b\x08" + b"\xff" * 9 + b"\x7f",
             b"\xa8\x80\x80\x80\x00\x03"]  # an overlong tag
    for data in cases:
        assert_request_equal(_wire.parse_request(data), pb.ComputeGradientRequest.FromString(data))


def test_random_bytes() -> None:
    rng = random.Random(9)
    for _ in range(20):
        data = rng.randbytes(rng.choice([1, 10, 1000, 100_000]))
        parse_like_protobuf(data, _wire.parse_request, pb.ComputeGradientRequest)


def test_millions_of_fields_do_not_loop_in_python() -> None:
    """4 MB of two-byte unknown fields, or of one-byte shape entries, parse in C."""
    many_fields = b"\x58\x00" * 2_000_000
    dims = b"\x01" * 4_000_000
    many_dims = length_field(2, length_field(2, dims)) + b"\x0a\x03mse"
    for data in (many_fields, many_dims, many_fields + b"\x0a\x01\xff"):
        start = time.monotonic()
        parse_like_protobuf(data, _wire.parse_request, pb.ComputeGradientRequest)
        assert time.monotonic() - start < 10.0


# --- the server's side: views, aligned copies, any conforming layout ------------------------

@pytest.mark.parametrize("codec", ["walk"], indirect=True)
def test_server_views_aligned_tensors_and_copies_the_others() -> None:
    from lossgrad import wire

    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    data = _wire.serialize_request(_wire.ComputeRequest(
        loss="mse", predictions=_wire.Tensor.of(x), targets=_wire.Tensor.of(x)))
    parsed = wire.parsed(wire.deserialize_request(data))
    assert parsed.predictions is not None
    array = wire.decode_tensor(parsed.predictions, "predictions")
    assert array.flags.aligned and not array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(data, np.uint8))  # a view: no copy
    shifted = b"\x00" + x.tobytes()  # the data one byte into the buffer
    odd = wire.decode_tensor(_wire.Tensor(pb.DATA_TYPE_FLOAT64, (2, 3),
                                          memoryview(shifted)[1:]), "predictions")
    assert odd.flags.aligned and not odd.flags.writeable
    assert np.array_equal(odd, x)


def test_server_reports_malformed_bytes_as_invalid_argument() -> None:
    from lossgrad import wire
    from lossgrad.errors import MALFORMED_REQUEST, InvalidArgumentError

    result = wire.deserialize_request(b"\x12\x03\x10\x80\x80")  # the deserializer does not raise
    assert isinstance(result, _wire.WireError)
    with pytest.raises(InvalidArgumentError) as info:
        wire.parsed(result)
    assert info.value.field == "request"
    assert info.value.reason == MALFORMED_REQUEST
    assert "predictions.shape: truncated varint" in str(info.value)


@pytest.mark.e2e
@pytest.mark.parametrize("seed", range(3))
def test_server_accepts_any_conforming_layout(server_address: str, seed: int) -> None:
    """A request in random valid layouts (fields reordered, unpacked shapes, tensors in
    pieces, unknown fields) gets the same response bits as the canonical bytes."""
    import grpc

    rng = random.Random(800 + seed)
    x = np.random.default_rng(seed).normal(size=(4, 3))
    message = pb.ComputeGradientRequest(
        loss="huber", reduction=pb.REDUCTION_SUM, params=pb.LossParams(delta=0.5),
        predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=x.shape, data=x.tobytes()),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=x.shape, data=(x * 0.5).tobytes()))
    with grpc.insecure_channel(server_address) as channel:
        call = channel.unary_unary("/lossgrad.v1.LossService/ComputeGradient")
        expected = call(message.SerializeToString(), timeout=30)
        for _ in range(10):
            layout = message_layout(rng, message, REQUEST_SCHEMA)
            same = pb.ComputeGradientRequest.FromString(layout)
            same.DiscardUnknownFields()
            assert same == message
            answer = pb.ComputeGradientResponse.FromString(call(layout, timeout=30))
            assert answer == pb.ComputeGradientResponse.FromString(expected)


@pytest.mark.e2e
def test_client_against_a_generated_protobuf_server() -> None:
    """Our client with a server that uses the generated classes: it parses the client's
    aligned requests and its canonical responses parse in the client."""
    from concurrent import futures

    import grpc
    import lossgrad
    from lossgrad_client import LossClient

    def compute_gradient(request: pb.ComputeGradientRequest,
                         context: grpc.ServicerContext) -> pb.ComputeGradientResponse:
        def array(tensor: pb.Tensor) -> np.ndarray:
            dtype = _wire.LITTLE_ENDIAN[tensor.dtype]
            return np.frombuffer(tensor.data, dtype).reshape(tuple(tensor.shape))

        result = lossgrad.compute(request.loss, array(request.predictions),
                                  array(request.targets), reduction="none",
                                  sample_weight=array(request.sample_weight),
                                  **{"delta": request.params.delta})
        assert result.gradient is not None and isinstance(result.loss, np.ndarray)
        return pb.ComputeGradientResponse(
            losses=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=result.loss.shape,
                             data=result.loss.tobytes()),
            positions=result.positions, positions_counted=result.positions_counted,
            weight_sum=result.weight_sum,
            gradient=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=result.gradient.shape,
                               data=result.gradient.tobytes()))

    handler = grpc.method_handlers_generic_handler("lossgrad.v1.LossService", {
        "ComputeGradient": grpc.unary_unary_rpc_method_handler(
            compute_gradient, request_deserializer=pb.ComputeGradientRequest.FromString,
            response_serializer=pb.ComputeGradientResponse.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rng = np.random.default_rng(10)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    t = rng.normal(size=(5, 7)).astype(np.float32)
    w = rng.uniform(size=5).astype(np.float32)
    try:
        with LossClient(f"127.0.0.1:{port}", timeout=30) as client:
            got = client.compute_gradient("huber", x, t, reduction="none", sample_weight=w,
                                          delta=0.25)
    finally:
        server.stop(0).wait()
    local = lossgrad.compute("huber", x, t, reduction="none", sample_weight=w, delta=0.25)
    assert isinstance(got.loss, np.ndarray) and local.gradient is not None
    assert got.loss.tobytes() == np.asarray(local.loss).tobytes()
    assert got.gradient.tobytes() == local.gradient.tobytes()
    assert got.gradient.shape == (5, 7) and got.gradient.dtype == np.float32
    assert (got.positions, got.positions_counted) == (local.positions, local.positions_counted)
