"""End to end: bad requests get INVALID_ARGUMENT naming the field, and the server lives on.

Requests the client would refuse to build go through the raw generated stub. After every
test a normal call must still succeed (the ``still_serving`` fixture).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad.server import create_server
from lossgrad.status import INTERNAL_MESSAGE, abort
from lossgrad_client import (
    InternalError,
    InvalidArgumentError,
    LossClient,
    ResourceExhaustedError,
    UnavailableError,
)
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])


@pytest.fixture(autouse=True)
def still_serving(client: LossClient) -> Iterator[None]:
    """After each test, the shared server still answers a normal call correctly."""
    yield
    result = client.compute_gradient("mse", [1.0, 3.0], [0.0, 1.0])
    assert result.loss == 2.5
    np.testing.assert_array_equal(result.gradient, [1.0, 2.0])


# --- helpers -----------------------------------------------------------------------------

def tensor(value: Any, dtype: Any = None) -> pb.Tensor:
    """A well-formed Tensor message."""
    array = np.asarray(value, dtype=dtype)
    codes = {"float32": pb.DATA_TYPE_FLOAT32, "float64": pb.DATA_TYPE_FLOAT64,
             "int32": pb.DATA_TYPE_INT32, "int64": pb.DATA_TYPE_INT64}
    little = array.astype(array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=codes[array.dtype.name], shape=array.shape, data=little.tobytes())


def request(loss: str = "mse", predictions: pb.Tensor | None = None,
            targets: pb.Tensor | None = None, **fields: Any) -> pb.ComputeLossRequest:
    """A ComputeLossRequest; predictions and targets default to a valid mse pair."""
    message = pb.ComputeLossRequest(loss=loss, **fields)
    message.predictions.CopyFrom(predictions or tensor([1.0, 2.0]))
    message.targets.CopyFrom(targets or tensor([0.0, 2.0]))
    return message


def raw_error(stub: pb_grpc.LossServiceStub, message: pb.ComputeLossRequest,
              gradient: bool = False) -> grpc.RpcError:
    """Send ``message`` (to ComputeLoss, or ComputeGradient) and return the RpcError."""
    if gradient:
        grad_message = pb.ComputeGradientRequest.FromString(message.SerializeToString())
        call: Any = stub.ComputeGradient
        payload: Any = grad_message
    else:
        call, payload = stub.ComputeLoss, message
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=30)
    return info.value


def metadata(err: grpc.RpcError) -> dict[str, str]:
    return {key: value for key, value in err.trailing_metadata()}  # type: ignore[attr-defined]


def assert_raw_invalid(err: grpc.RpcError, field: str, reason: str | None = None) -> None:
    """INVALID_ARGUMENT whose details start with ``field`` and whose metadata names it."""
    assert err.code() is INVALID  # type: ignore[attr-defined]
    details = err.details()  # type: ignore[attr-defined]
    assert details.startswith(field), details
    meta = metadata(err)
    assert meta["lossgrad-error-field"].startswith(field)
    if reason is not None:
        assert meta["lossgrad-error-reason"] == reason


def invalid(call: Any, field: str, reason: str | None = None) -> InvalidArgumentError:
    """Run ``call`` through the client; assert INVALID_ARGUMENT naming ``field`` and return it."""
    with pytest.raises(InvalidArgumentError) as info:
        call()
    err = info.value
    assert err.code is INVALID
    assert err.message.startswith(field), err.message
    assert err.field is not None and err.field.startswith(field)
    if reason is not None:
        assert err.reason == reason
    return err


# --- names and parameters ------------------------------------------------------------------

def test_unknown_loss(client: LossClient) -> None:
    err = invalid(lambda: client.compute_loss("cross_entropy", [1.0], [1.0]), "loss",
                  "UNKNOWN_LOSS")
    assert "cross_entropy" in err.message
    assert "sparse_categorical_cross_entropy" in err.message  # lists the known names
    assert isinstance(err.__cause__, grpc.RpcError)


def test_unknown_parameter_through_the_raw_stub(stub: pb_grpc.LossServiceStub) -> None:
    err = raw_error(stub, request("mse", params=pb.LossParams(delta=1.0)))
    assert_raw_invalid(err, "params.delta", "UNKNOWN_PARAMETER")


def test_unknown_parameter_through_the_client(client: LossClient) -> None:
    invalid(lambda: client.compute_gradient("mse", [1.0], [1.0], delta=1.0), "params.delta",
            "UNKNOWN_PARAMETER")
    invalid(lambda: client.compute_loss("kl_divergence", PROBS, PROBS, from_logits=True),
            "params.from_logits", "UNKNOWN_PARAMETER")


@pytest.mark.parametrize("delta", [0.0, -1.0, math.inf, math.nan])
def test_delta_must_be_positive(client: LossClient, delta: float) -> None:
    invalid(lambda: client.compute_loss("huber", [1.0], [2.0], delta=delta), "params.delta",
            "PARAMETER_OUT_OF_RANGE")
    invalid(lambda: client.compute_loss("pseudo_huber", [1.0], [2.0], delta=delta),
            "params.delta", "PARAMETER_OUT_OF_RANGE")


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "categorical_cross_entropy",
                                  "sparse_categorical_cross_entropy"])
def test_label_smoothing_outside_unit_interval(
    client: LossClient, loss: str, smoothing: float
) -> None:
    targets: Any = [0, 2] if loss.startswith("sparse") else PROBS
    invalid(lambda: client.compute_loss(loss, PROBS, targets, label_smoothing=smoothing),
            "params.label_smoothing", "PARAMETER_OUT_OF_RANGE")


def test_label_smoothing_zero_is_accepted(client: LossClient) -> None:
    result = client.compute_loss("categorical_cross_entropy", PROBS, PROBS, label_smoothing=0.0)
    assert result.loss > 0


def test_alias_preset_cannot_be_overridden(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("sigmoid_cross_entropy", [0.5], [1.0], from_logits=False),
            "params.from_logits")


def test_unknown_reduction_value(stub: pb_grpc.LossServiceStub) -> None:
    message = request()
    message.reduction = 7  # type: ignore[assignment]  # not in the enum
    assert_raw_invalid(raw_error(stub, message), "reduction", "UNKNOWN_REDUCTION")


# --- tensors on the wire ---------------------------------------------------------------------

def test_unspecified_dtype(stub: pb_grpc.LossServiceStub) -> None:
    bad = tensor([1.0, 2.0])
    bad.dtype = pb.DATA_TYPE_UNSPECIFIED
    err = raw_error(stub, request(predictions=bad))
    assert_raw_invalid(err, "predictions.dtype", "UNSUPPORTED_DTYPE")
    assert "DATA_TYPE_UNSPECIFIED" in err.details()  # type: ignore[attr-defined]


def test_dtype_value_outside_the_enum(stub: pb_grpc.LossServiceStub) -> None:
    bad = tensor([1.0, 2.0])
    bad.dtype = 42  # type: ignore[assignment]
    assert_raw_invalid(raw_error(stub, request(targets=bad), gradient=True), "targets.dtype",
                       "UNSUPPORTED_DTYPE")


def test_int32_predictions(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", np.array([1, 2], dtype=np.int32), [1.0, 2.0]),
            "predictions.dtype", "UNSUPPORTED_DTYPE")


def test_float_class_indices(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [0.0, 2.0]),
            "targets.dtype", "UNSUPPORTED_DTYPE")


@pytest.mark.parametrize("gradient", [False, True])
def test_byte_length_mismatch(stub: pb_grpc.LossServiceStub, gradient: bool) -> None:
    bad = tensor([1.0, 2.0])
    bad.data = bad.data[:12]
    err = raw_error(stub, request(predictions=bad), gradient=gradient)
    assert_raw_invalid(err, "predictions.data", "BYTE_SIZE_MISMATCH")
    details = err.details()  # type: ignore[attr-defined]
    assert "12" in details and "16" in details  # both the sent and the needed length


def test_negative_dimension(stub: pb_grpc.LossServiceStub) -> None:
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[2, -1], data=b"")
    assert_raw_invalid(raw_error(stub, request(targets=bad)), "targets.shape[1]",
                       "NEGATIVE_DIMENSION")


def test_huge_declared_shape_is_rejected_fast(stub: pb_grpc.LossServiceStub) -> None:
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[2**40, 2**40], data=b"\0" * 16)
    start = time.monotonic()
    err = raw_error(stub, request(predictions=bad))
    assert time.monotonic() - start < 5.0
    assert_raw_invalid(err, "predictions.data", "BYTE_SIZE_MISMATCH")


def test_zero_sized_tensor_too_large_for_numpy(stub: pb_grpc.LossServiceStub) -> None:
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[0, 2**62, 2**62], data=b"")
    assert_raw_invalid(raw_error(stub, request(predictions=bad)), "predictions.shape")


def test_too_many_dimensions(stub: pb_grpc.LossServiceStub) -> None:
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[1] * 65, data=b"\0" * 8)
    assert_raw_invalid(raw_error(stub, request(predictions=bad)), "predictions.shape")


@pytest.mark.parametrize("missing", ["predictions", "targets"])
def test_missing_tensor(stub: pb_grpc.LossServiceStub, missing: str) -> None:
    message = request()
    message.ClearField(missing)  # type: ignore[arg-type]
    assert_raw_invalid(raw_error(stub, message), missing, "MISSING_FIELD")


# --- bytes that are not a message ------------------------------------------------------------

def raw_bytes_error(server_address: str, data: bytes, method: str) -> grpc.RpcError:
    """Send ``data`` as the request of ``method`` (no protobuf on this side)."""
    with grpc.insecure_channel(server_address) as channel:
        call = channel.unary_unary(f"/lossgrad.v1.LossService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(data, timeout=30)
    return info.value


@pytest.mark.parametrize(("data", "where"), [
    (request().SerializeToString()[:-3], "targets: length"),  # truncated
    (b"\x0a\x01\xff", "loss: not valid UTF-8"),
    (b"\x12\x03\x10\x80\x80", "predictions.shape: truncated varint"),
    (b"\x28" + b"\x80" * 10 + b"\x01", "reduction: varint at byte 1 is longer than 10"),
    (b"\x08\x05", "loss: wire type 0"),
    (b"\x5b\x5c", "groups are not supported"),  # field 11, unknown
    (b"\x0a\xff\xff\xff\xff\x07mse", "loss: length 2147483647"),
])
@pytest.mark.parametrize("method", ["ComputeLoss", "ComputeGradient"])
def test_malformed_bytes(server_address: str, data: bytes, where: str, method: str) -> None:
    err = raw_bytes_error(server_address, data, method)
    assert_raw_invalid(err, "request", "MALFORMED_REQUEST")
    assert where in err.details()  # type: ignore[attr-defined]


def test_random_bytes_are_invalid_argument(server_address: str) -> None:
    rng = np.random.default_rng(19)
    for size in (1, 7, 100, 10_000, 1_000_000):
        err = raw_bytes_error(server_address, rng.bytes(size), "ComputeGradient")
        assert err.code() is INVALID  # type: ignore[attr-defined]


# --- shapes ------------------------------------------------------------------------------------

def test_shape_mismatch(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", [1.0, 2.0, 3.0], [1.0, 2.0]), "targets.shape",
            "SHAPE_MISMATCH")
    invalid(lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [0, 1, 2]),
            "targets.shape", "SHAPE_MISMATCH")


def test_empty_batch(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", np.zeros(0), np.zeros(0)), "predictions.shape",
            "EMPTY_BATCH")


def test_scalar_predictions(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", 1.0, 2.0), "predictions.shape")


def test_class_loss_needs_a_class_axis(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("categorical_cross_entropy", [0.5, 0.5], [0.5, 0.5]),
            "predictions.shape")


# --- values --------------------------------------------------------------------------------------

def test_class_index_out_of_range(client: LossClient) -> None:
    err = invalid(
        lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [0, 3]),
        "targets", "LABEL_OUT_OF_RANGE")
    assert err.field == "targets.data[1]"
    invalid(lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [-1, 0]),
            "targets", "LABEL_OUT_OF_RANGE")


def test_ignore_index_is_not_out_of_range(client: LossClient) -> None:
    result = client.compute_loss("sparse_categorical_cross_entropy", PROBS, [-100, 2],
                                 ignore_index=-100)
    assert result.positions == 2
    assert result.positions_counted == 1
    assert result.loss == pytest.approx(-math.log(0.6))


def test_hinge_targets_mixing_label_sets(client: LossClient) -> None:
    for loss in ("hinge", "squared_hinge"):
        invalid(lambda loss=loss: client.compute_loss(loss, [0.5, 0.5, 0.5], [1.0, 0.0, -1.0]),
                "targets", "INVALID_LABELS")
        invalid(lambda loss=loss: client.compute_loss(loss, [0.5, 0.5], [1.0, 2.0]),
                "targets", "INVALID_LABELS")


def test_hinge_accepts_either_label_set(client: LossClient) -> None:
    signed = client.compute_loss("hinge", [0.5, -2.0], [1.0, -1.0], reduction="none")
    binary = client.compute_loss("hinge", [0.5, -2.0], [1, 0], reduction="none")
    np.testing.assert_array_equal(signed.loss, [0.5, 0.0])
    np.testing.assert_array_equal(binary.loss, [0.5, 0.0])


def test_bce_predictions_outside_unit_interval(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("binary_cross_entropy", [0.5, 1.5], [1.0, 0.0]),
            "predictions", "VALUE_OUT_OF_RANGE")
    logits = client.compute_loss("binary_cross_entropy", [0.5, 1.5], [1.0, 0.0],
                                 from_logits=True)
    assert logits.loss > 0


def test_bce_targets_outside_unit_interval(client: LossClient) -> None:
    for from_logits in (False, True):
        invalid(lambda f=from_logits: client.compute_loss(
            "binary_cross_entropy", [0.5, 0.5], [1.0, -0.5], from_logits=f),
            "targets", "VALUE_OUT_OF_RANGE")


def test_kl_targets_outside_unit_interval(client: LossClient) -> None:
    bad = np.array([[1.2, -0.2, 0.0], [0.2, 0.3, 0.5]])
    invalid(lambda: client.compute_loss("kl_divergence", PROBS, bad), "targets",
            "VALUE_OUT_OF_RANGE")


def test_categorical_probabilities_outside_unit_interval(client: LossClient) -> None:
    bad = np.array([[1.5, -0.5, 0.0], [0.2, 0.3, 0.5]])
    invalid(lambda: client.compute_loss("categorical_cross_entropy", bad, PROBS), "predictions",
            "VALUE_OUT_OF_RANGE")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_predictions(client: LossClient, bad: float) -> None:
    err = invalid(lambda: client.compute_loss("mse", [1.0, bad], [0.0, 0.0]), "predictions",
                  "NONFINITE_INPUT")
    assert err.field == "predictions.data[1]"
    assert "allow_nonfinite" in err.message
    accepted = client.compute_loss("mse", [1.0, bad], [0.0, 0.0], allow_nonfinite=True)
    assert isinstance(accepted.loss, float) and not math.isfinite(accepted.loss)


def test_nonfinite_targets(client: LossClient) -> None:
    invalid(lambda: client.compute_gradient("mse", [1.0, 2.0], [math.nan, 0.0]), "targets",
            "NONFINITE_INPUT")
    accepted = client.compute_gradient("mse", [1.0, 2.0], [math.nan, 0.0], allow_nonfinite=True)
    assert math.isnan(accepted.gradient[0])
    assert accepted.gradient[1] == 2.0  # 2 (x - t) / n


def test_negative_sample_weight(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", [1.0, 2.0], [0.0, 0.0], sample_weight=[1.0, -1.0]),
            "sample_weight", "VALUE_OUT_OF_RANGE")


def test_nonfinite_sample_weight(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", [1.0, 2.0], [0.0, 0.0],
                                        sample_weight=[1.0, math.inf], allow_nonfinite=True),
            "sample_weight", "VALUE_OUT_OF_RANGE")


def test_sample_weight_wrong_shape(client: LossClient) -> None:
    x = np.ones((2, 3))
    invalid(lambda: client.compute_loss("mse", x, x, sample_weight=np.ones(3)),
            "sample_weight.shape", "SHAPE_MISMATCH")
    invalid(lambda: client.compute_loss("mse", x, x, sample_weight=np.ones((3, 2))),
            "sample_weight.shape", "SHAPE_MISMATCH")


def test_class_weight_wrong_length(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [0, 1],
                                        class_weight=[1.0, 2.0]),
            "params.class_weight", "SHAPE_MISMATCH")


def test_negative_class_weight(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("sparse_categorical_cross_entropy", PROBS, [0, 1],
                                        class_weight=[1.0, -2.0, 1.0]),
            "params.class_weight", "PARAMETER_OUT_OF_RANGE")


# --- other status codes ----------------------------------------------------------------------

def test_message_larger_than_the_limit_is_resource_exhausted() -> None:
    server, port = create_server("127.0.0.1", 0, max_workers=1, max_message_bytes=4096,
                                 warm=False)
    try:
        with LossClient(f"127.0.0.1:{port}", timeout=30) as small:
            big = np.zeros(4096)
            with pytest.raises(ResourceExhaustedError) as info:
                small.compute_loss("mse", big, big)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert small.compute_loss("mse", [1.0], [0.0]).loss == 1.0
    finally:
        server.stop(0).wait()


def test_unreachable_server_is_unavailable() -> None:
    server, port = create_server("127.0.0.1", 0, max_workers=1, warm=False)
    server.stop(0).wait()  # the port is now closed
    with LossClient(f"127.0.0.1:{port}", timeout=10) as nowhere:
        with pytest.raises(UnavailableError) as info:
            nowhere.list_losses()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_unexpected_errors_are_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A non-domain exception becomes INTERNAL with a generic message; the log has it."""

    def explode(request: pb.ListLossesRequest, context: grpc.ServicerContext) -> None:
        try:
            raise RuntimeError("secret detail")
        except RuntimeError as err:
            abort(context, err, "ListLosses")

    handler = grpc.method_handlers_generic_handler("lossgrad.v1.LossService", {
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            explode, request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="lossgrad.service"), \
                LossClient(f"127.0.0.1:{port}", timeout=30) as failing:
            with pytest.raises(InternalError) as info:
                failing.list_losses()
        assert info.value.message == INTERNAL_MESSAGE
        assert "secret" not in str(info.value)
        assert info.value.reason is None
        logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
        assert any(isinstance(e, RuntimeError) and "secret detail" in str(e) for e in logged)
    finally:
        server.stop(0).wait()
