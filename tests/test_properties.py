"""Property-based tests of request decoding and validation (hypothesis).

Every request, from arbitrary bytes to well-formed ComputeGradientRequest messages with
arbitrary dtypes, shapes, data, loss names, parameters and reductions, either computes or
raises a :class:`lossgrad.errors.LossgradError`; through a real server it is answered OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never INTERNAL or UNKNOWN.

In process, a request takes the server's own path: ``wire.deserialize_request`` (the gRPC
request deserializer), then ``wire.parsed``, ``wire.check_elements`` and
``service._compute``, which is what ``LossService.ComputeLoss``/``ComputeGradient`` run
between the deserializer and ``status.abort``. Tensors that could be valid hold at most
``_MAX_VALID_ELEMENTS`` elements, so memory stays small whatever the server's limits.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lossgrad import catalog, service, wire
from lossgrad.errors import LossgradError
from lossgrad_client import LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

_INT64 = (-(1 << 63), (1 << 63) - 1)
_INT32 = (-(1 << 31), (1 << 31) - 1)
_MAX_VALID_ELEMENTS = 512  # tensors whose bytes match their shape stay this small
_ELEMENTS_LIMIT = 1 << 20  # the max_elements the in-process path checks against
_NAMES = sorted({name for spec in catalog.LOSSES for name in (spec.name, *spec.aliases)})
_ITEMSIZE = {pb.DATA_TYPE_FLOAT32: 4, pb.DATA_TYPE_FLOAT64: 8, pb.DATA_TYPE_INT32: 4,
             pb.DATA_TYPE_INT64: 8, pb.DATA_TYPE_FLOAT16: 2, pb.DATA_TYPE_BFLOAT16: 2}
_FLOATS = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_FLOAT64: "<f8",
           pb.DATA_TYPE_FLOAT16: "<f2"}
_INTS = {pb.DATA_TYPE_INT32: "<i4", pb.DATA_TYPE_INT64: "<i8"}
_ACCEPTED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.RESOURCE_EXHAUSTED)


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` nine times in ten, else ``rare`` (so that many requests are valid)."""
    return st.integers(0, 9).flatmap(lambda i: common if i else rare)


_SUPPORTED = sorted(_ITEMSIZE)
dtypes = mostly(st.sampled_from(_SUPPORTED),
                st.one_of(st.sampled_from(sorted(pb.DataType.values())),  # UNSPECIFIED too
                          st.integers(*_INT32)))
dims = st.one_of(st.integers(0, 6), st.integers(-3, -1),
                 st.sampled_from([_INT64[0], -1, 1 << 31, 1 << 40, 1 << 62, _INT64[1]]),
                 st.integers(*_INT64))
shapes = mostly(st.lists(mostly(st.integers(1, 6), st.just(0)), max_size=3),
                st.one_of(st.lists(dims, max_size=4),
                          st.lists(st.integers(0, 2), min_size=60, max_size=70)))  # ndim ~64
doubles = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def tensor_data(draw: st.DrawFn, dtype: int, shape: list[int]) -> bytes:
    """Bytes for a tensor: matching ``shape`` when that is small (values picked to
    reach the kernels: small labels, floats with NaN/inf), otherwise random."""
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    garbled = draw(st.integers(0, 11)) == 0
    if dtype not in _ITEMSIZE or not 0 <= count <= _MAX_VALID_ELEMENTS or garbled:
        return draw(st.binary(max_size=72))
    if dtype in _FLOATS or dtype == pb.DATA_TYPE_BFLOAT16:
        values = draw(st.lists(mostly(st.floats(-3, 3), doubles),
                               min_size=count, max_size=count))
        with np.errstate(over="ignore"):  # float64 values that overflow float32 become inf
            return _float_bytes(np.array(values), dtype)
    values = draw(st.lists(mostly(st.integers(-1, 5), st.integers(*_INT32)),
                           min_size=count, max_size=count))
    return np.array(values, dtype=_INTS[dtype]).tobytes()


@st.composite
def tensors(draw: st.DrawFn, like: pb.Tensor | None = None) -> pb.Tensor:
    """A Tensor message; given ``like``, often one whose shape fits it (same, or without
    the last axis as class indices)."""
    dtype = draw(dtypes)
    shape = draw(shapes)
    if like is not None and draw(st.integers(0, 3)):
        same = list(like.shape)
        shape = draw(st.sampled_from([same, same[:-1]]))
        dtype = draw(st.sampled_from([like.dtype, like.dtype, *_SUPPORTED]))
    return pb.Tensor(dtype=dtype, shape=shape, data=draw(tensor_data(dtype, shape)))


@st.composite
def loss_params(draw: st.DrawFn) -> pb.LossParams:
    """Any subset of the LossParams fields, with arbitrary values."""
    fields: dict[str, Any] = {}
    for name, values in (("delta", doubles), ("pos_weight", doubles),
                         ("label_smoothing", st.one_of(st.floats(0, 1), doubles)),
                         ("from_logits", st.booleans()), ("log_predictions", st.booleans()),
                         ("ignore_index", st.one_of(st.integers(-2, 5), st.integers(*_INT64))),
                         ("class_weight", st.lists(st.one_of(st.floats(0, 2), doubles),
                                                   max_size=8))):
        if draw(st.booleans()):
            fields[name] = draw(values)
    return pb.LossParams(**fields)


def _array_tensor(values: list[Any], shape: tuple[int, ...], dtype: int) -> pb.Tensor:
    """A tensor of ``values``; floats for an integer dtype are clipped and truncated."""
    array = np.array(values)
    if dtype in _INTS and array.dtype.kind == "f":
        array = np.nan_to_num(array).clip(-10, 10)
    with np.errstate(over="ignore"):  # float64 values past float32's range become inf
        data = (_float_bytes(array.reshape(shape), dtype) if dtype not in _INTS
                else array.astype(_INTS[dtype]).reshape(shape).tobytes())
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _float_bytes(array: np.ndarray, dtype: int) -> bytes:
    """Little-endian bytes of ``array`` as the floating DataType ``dtype``."""
    if dtype == pb.DATA_TYPE_BFLOAT16:  # the upper half of each float32
        return (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return array.astype(_FLOATS[dtype]).tobytes()


@st.composite
def loss_requests(draw: st.DrawFn) -> pb.ComputeGradientRequest:
    """A request shaped for one catalog loss (rows of classes or elementwise), with
    values that are mostly in its domain, the loss's own parameters and sometimes others."""
    spec = draw(st.sampled_from(catalog.LOSSES))
    rows, classes = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    shape = (rows, classes)
    float_type = draw(st.sampled_from(sorted(_FLOATS)))
    unit = mostly(st.floats(0, 1), doubles)
    real = mostly(st.floats(-30, 30), doubles)
    n = rows * classes
    predictions = _array_tensor(draw(st.lists(st.one_of(unit, real), min_size=n, max_size=n)),
                                shape, float_type)
    if spec.layout is catalog.Layout.SPARSE_ROWS:
        labels = draw(st.lists(mostly(st.integers(0, classes - 1), st.integers(-3, 8)),
                               min_size=rows, max_size=rows))
        targets = _array_tensor(labels, (rows,), draw(st.sampled_from(sorted(_INTS))))
    else:
        values = st.one_of(unit, real, st.sampled_from([-1.0, 0.0, 1.0]))
        targets = _array_tensor(draw(st.lists(values, min_size=n, max_size=n)), shape,
                                draw(mostly(st.just(float_type), st.sampled_from(_SUPPORTED))))
    message = pb.ComputeGradientRequest(
        loss=draw(st.sampled_from((spec.name, *spec.aliases))), predictions=predictions,
        targets=targets, reduction=draw(mostly(st.integers(0, 3), st.integers(*_INT32))),
        allow_nonfinite=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        weights = draw(st.lists(mostly(st.floats(0, 2), doubles), min_size=rows, max_size=rows))
        message.sample_weight.CopyFrom(_array_tensor(weights, (rows,), float_type))
    params = draw(loss_params())
    own = {p.name for p in spec.params}
    if draw(st.integers(0, 3)):  # usually only the loss's own parameters
        for name in {field.name for field, _ in params.ListFields()} - own:
            params.ClearField(name)
    message.params.CopyFrom(params)
    return message


@st.composite
def arbitrary_requests(draw: st.DrawFn) -> pb.ComputeGradientRequest:
    """A structurally valid ComputeGradientRequest with arbitrary contents."""
    message = pb.ComputeGradientRequest(
        loss=draw(mostly(st.sampled_from(_NAMES), st.text(max_size=12))),
        reduction=draw(mostly(st.integers(0, 3), st.integers(*_INT32))),
        allow_nonfinite=draw(st.booleans()))
    if draw(st.integers(0, 9)):
        message.predictions.CopyFrom(draw(tensors()))
    if draw(st.integers(0, 9)):
        message.targets.CopyFrom(draw(tensors(message.predictions)))
    if draw(st.integers(0, 3)) == 0:
        message.sample_weight.CopyFrom(draw(tensors(message.predictions)))
    if draw(st.booleans()):
        message.params.CopyFrom(draw(loss_params()))
    return message


requests = st.one_of(loss_requests(), arbitrary_requests())


def _mutated(data: bytes, position: int, byte: int) -> bytes:
    """``data`` with one byte replaced (or appended past its end)."""
    if not data:
        return bytes([byte])
    position %= len(data)
    return data[:position] + bytes([byte]) + data[position + 1:]


# Raw request bytes: random, a valid message with one byte changed or cut short,
# and valid messages followed by random fields.
raw_requests = st.one_of(
    st.binary(max_size=200),
    st.builds(_mutated, requests.map(pb.ComputeGradientRequest.SerializeToString),
              st.integers(0, 1 << 16), st.integers(0, 255)),
    st.builds(lambda data, cut: data[:cut],
              requests.map(pb.ComputeGradientRequest.SerializeToString),
              st.integers(0, 400)),
    st.builds(lambda data, extra: data + extra,
              requests.map(pb.ComputeGradientRequest.SerializeToString),
              st.binary(max_size=40)),
)


def _serve_in_process(data: bytes, gradient: bool) -> None:
    """The server's request path, up to where ``status.abort`` would map an error."""
    request = wire.parsed(wire.deserialize_request(data))
    wire.check_elements(request, _ELEMENTS_LIMIT)
    response = service._compute(request, gradient=gradient)
    assert response.positions >= 0
    if gradient:
        assert response.gradient is not None
    encoded = response.gradient
    if encoded is not None:
        predictions = request.predictions
        assert predictions is not None
        assert encoded.shape == tuple(predictions.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=requests, gradient=st.booleans())
def test_any_structured_request_computes_or_raises_a_lossgrad_error(
        message: pb.ComputeGradientRequest, gradient: bool) -> None:
    try:
        _serve_in_process(message.SerializeToString(), gradient)
    except LossgradError as err:
        event(err.reason)
    else:
        event("OK")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=raw_requests, gradient=st.booleans())
def test_any_bytes_compute_or_raise_a_lossgrad_error(data: bytes, gradient: bool) -> None:
    try:
        _serve_in_process(data, gradient)
    except LossgradError as err:
        event(err.reason)
    else:
        event("OK")


@st.composite
def _shape_with_nbytes(draw: st.DrawFn) -> tuple[list[int], int]:
    shape = draw(st.lists(dims, max_size=5))
    return shape, draw(st.integers(0, 64))


@settings(max_examples=300, deadline=None)
@given(dtype=dtypes, shape_nbytes=_shape_with_nbytes())
def test_decode_tensor_accepts_exactly_matching_bytes(
        dtype: int, shape_nbytes: tuple[list[int], int]) -> None:
    """A tensor decodes iff its dtype is supported, no dimension is negative, its bytes
    are ``prod(shape) * itemsize`` and NumPy can describe the shape (zero-sized axes
    counted as 1); the array views those bytes with that shape."""
    shape, nbytes = shape_nbytes
    data = struct.pack(f"{nbytes}B", *range(nbytes))
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)
    request = wire.parsed(wire.deserialize_request(
        pb.ComputeGradientRequest(predictions=tensor).SerializeToString()))
    assert request.predictions is not None
    valid = dtype in _ITEMSIZE and all(d >= 0 for d in shape) and len(shape) <= 64 \
        and math.prod(shape) * _ITEMSIZE[dtype] == nbytes \
        and math.prod(max(d, 1) for d in shape) * _ITEMSIZE[dtype] <= np.iinfo(np.intp).max
    try:
        array = wire.decode_tensor(request.predictions, "predictions")
    except LossgradError as err:
        assert not valid, err
        assert err.field.startswith("predictions")
        return
    assert valid
    assert array.shape == tuple(shape)
    assert array.tobytes() == data


# --- through a real server ---------------------------------------------------------------

@pytest.mark.e2e
def test_random_requests_never_get_internal_and_the_server_keeps_serving(
        server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        methods = {name: channel.unary_unary(f"/lossgrad.v1.LossService/{name}")
                   for name in ("ComputeGradient", "ComputeLoss")}

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(data=st.one_of(raw_requests,
                              requests.map(pb.ComputeGradientRequest.SerializeToString)),
               method=st.sampled_from(sorted(methods)))
        def send(data: bytes, method: str) -> None:
            try:
                methods[method](data, timeout=60)
            except grpc.RpcError as err:
                assert err.code() in _ACCEPTED, (err.code(), err.details(), data)

        send()

    with LossClient(server_address, timeout=60) as client:
        result = client.compute_gradient("mse", [1.0, 3.0], [0.0, 1.0])
    assert result.loss == 2.5
    np.testing.assert_array_equal(result.gradient, [1.0, 2.0])
