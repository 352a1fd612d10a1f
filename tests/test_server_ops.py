"""Operator-facing behaviour of a real server: grpc.health.v1, reflection, limits,
deadlines and the google.rpc.Status of every error (read through raw stubs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from lossgrad.server import LossServer, create_server
from lossgrad_client import DeadlineExceededError, LossClient, ResourceExhaustedError
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

SERVICE = "lossgrad.v1.LossService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _tensor(array: np.ndarray) -> pb.Tensor:
    dtype = {np.float32: pb.DATA_TYPE_FLOAT32, np.float64: pb.DATA_TYPE_FLOAT64,
             np.int64: pb.DATA_TYPE_INT64}[array.dtype.type]
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


# --- health -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_health_check_and_watch(server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        assert _check(channel, "") == SERVING
        assert _check(channel, SERVICE) == SERVING  # the session server is warmed
        with pytest.raises(grpc.RpcError) as info:
            _check(channel, "no.such.Service")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()


@pytest.mark.e2e
def test_readiness_turns_not_serving_on_stop_and_the_health_port_answers(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    server, address = start(warm=False, health_port=0)
    assert server.health_port is not None and server.health_port > 0
    health_address = f"127.0.0.1:{server.health_port}"
    with grpc.insecure_channel(health_address) as health_channel, \
            grpc.insecure_channel(address) as channel:
        assert _check(health_channel, "") == SERVING
        assert _check(health_channel, SERVICE) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
        assert next(watch).status == SERVING
        # The health-only port serves nothing else.
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(health_channel).ListLosses(pb.ListLossesRequest(), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        stopped = server.stop(2.0)  # the open Watch keeps the server in its grace period
        assert next(watch).status == NOT_SERVING
        assert _check(health_channel, SERVICE) == NOT_SERVING  # while calls drain
        assert _check(health_channel, "") == SERVING
        assert stopped.wait(30)


def test_a_health_port_that_is_taken_fails(start: Callable[..., tuple[LossServer, str]]) -> None:
    server, _ = start(warm=False, health_port=0)
    with pytest.raises(OSError, match="cannot bind"):
        create_server("127.0.0.1", 0, warm=False, health_port=server.health_port)


# --- reflection -------------------------------------------------------------------------------

@pytest.mark.e2e
def test_reflection_lists_the_service_and_its_methods(server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} >= {"ComputeLoss", "ComputeGradient",
                                                      "ListLosses"}
        request = pool.FindMessageTypeByName("lossgrad.v1.ComputeLossRequest")
        assert "predictions" in request.fields_by_name


@pytest.mark.e2e
def test_reflection_can_be_turned_off(start: Callable[..., tuple[LossServer, str]]) -> None:
    _, address = start(warm=False, reflection=False)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


# --- limits -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_max_elements_is_checked_from_the_declared_shapes(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    _, address = start(max_elements=1000)
    with LossClient(address, timeout=30) as client:
        assert client.compute_loss("mse", np.zeros(500), np.zeros(500)).loss == 0.0
        with pytest.raises(ResourceExhaustedError) as info:
            client.compute_loss("mse", np.zeros(501), np.zeros(501))
        assert "1002 elements" in str(info.value) and "limit is 1000" in str(info.value)
        assert info.value.reason == "TOO_MANY_ELEMENTS"
    # A huge declared shape with a few bytes: rejected on the shape, before any array.
    request = pb.ComputeLossRequest(
        loss="mse", predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1 << 40],
                                          data=b"\0" * 8),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2], data=b"\0" * 8))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as raw:
            pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    assert raw.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 1000" in raw.value.details()


@pytest.mark.e2e
def test_max_message_bytes_is_resource_exhausted(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    _, address = start(warm=False, max_message_bytes=64 * 1024)
    request = pb.ComputeLossRequest(loss="mse", predictions=_tensor(np.zeros(10_000)),
                                targets=_tensor(np.zeros(10_000)))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ComputeLoss(request, timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(64 * 1024) in info.value.details()
        assert len(stub.ListLosses(pb.ListLossesRequest(), timeout=30).losses) > 0


@pytest.mark.e2e
def test_max_concurrent_rpcs_refuses_the_extra_call(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    server, address = start(max_concurrent_rpcs=1, max_workers=2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2_000_000, 4)).astype(np.float64)
    labels = rng.integers(0, 4, size=2_000_000)
    outcomes: list[str] = []

    def slow() -> None:
        with LossClient(address, timeout=120) as client:
            for _ in range(100):
                try:
                    client.compute_gradient("sparse_categorical_cross_entropy", logits,
                                            labels, from_logits=True)
                except ResourceExhaustedError:  # a probe of the loop below held the slot
                    continue
                outcomes.append("ok")
                return

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        refused = False
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            deadline = time.monotonic() + 60
            while worker.is_alive() and time.monotonic() < deadline:
                try:
                    stub.ListLosses(pb.ListLossesRequest(), timeout=30)
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "limit of 1 concurrent calls" in err.details()
                    assert _reason(err) == "TOO_MANY_CONCURRENT_CALLS"
                    # probes are never refused, however busy the server is
                    assert _check(channel, SERVICE) == SERVING
                    refused = True
                    break
                time.sleep(0.005)
    finally:
        worker.join(120)
    assert outcomes == ["ok"]
    assert refused, "no call was refused while the slow one ran"
    assert server.telemetry.registry.get_sample_value(
        "lossgrad_refused_calls_total",
        {"method": "/lossgrad.v1.LossService/ListLosses",
         "reason": "TOO_MANY_CONCURRENT_CALLS"}) >= 1


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


@pytest.mark.e2e
def test_calls_cancelled_while_queued_give_their_slot_back(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    """A call that waits in the pool's queue and is cancelled there still ends its task,
    so the limit's count comes back to zero and the full limit is usable afterwards."""
    _, address = start(max_concurrent_rpcs=4, max_workers=1)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1_000_000, 4))
    labels = rng.integers(0, 4, size=1_000_000)
    request = pb.ComputeGradientRequest(
        loss="sparse_categorical_cross_entropy", predictions=_tensor(logits),
        targets=_tensor(labels), params=pb.LossParams(from_logits=True))
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 1 << 28),
            ("grpc.max_receive_message_length", 1 << 28)]) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        for _ in range(3):
            calls = [stub.ComputeGradient.future(request, timeout=60) for _ in range(4)]
            time.sleep(0.05)
            for call in calls[1:]:  # queued behind the first on the only worker
                call.cancel()
            assert calls[0].result().gradient.shape == [1_000_000, 4]
        # all four slots are free again: four calls at once are admitted
        small = pb.ComputeLossRequest(loss="mse", predictions=_tensor(np.ones(3)),
                                      targets=_tensor(np.ones(3)))
        results = [stub.ComputeLoss.future(small, timeout=30) for _ in range(4)]
        assert [r.result().loss for r in results] == [0.0] * 4


# --- deadlines --------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_tiny_timeout_is_deadline_exceeded_and_the_server_keeps_serving(
    client: LossClient, server_address: str,
) -> None:
    rng = np.random.default_rng(1)
    big = rng.normal(size=(1_000_000, 8)).astype(np.float32)
    labels = rng.integers(0, 8, size=1_000_000)
    with LossClient(server_address, timeout=0.001) as hasty:
        with pytest.raises(DeadlineExceededError):
            hasty.compute_gradient("sparse_categorical_cross_entropy", big, labels,
                                   from_logits=True)
    assert client.compute_loss("mse", [1.0, 3.0], [1.0, 1.0]).loss == 2.0


@pytest.mark.e2e
def test_a_call_whose_deadline_passed_in_the_queue_is_not_computed(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    server, address = start(max_workers=1)
    rng = np.random.default_rng(2)
    slow = pb.ComputeGradientRequest(
        loss="sparse_categorical_cross_entropy", params=pb.LossParams(from_logits=True),
        predictions=_tensor(rng.normal(size=(2_000_000, 8))),
        targets=_tensor(rng.integers(0, 8, size=2_000_000)))
    quick = pb.ComputeLossRequest(loss="mse", predictions=_tensor(np.zeros(1000)),
                                  targets=_tensor(np.zeros(1000)))
    options = [("grpc.max_send_message_length", 256 << 20),
               ("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        stub.ListLosses(pb.ListLossesRequest(), timeout=30)  # connected
        # Calls on one connection are accepted in order: the slow one takes the only
        # worker, and the quick one waits in the queue until its deadline has passed.
        running = stub.ComputeGradient.future(slow, timeout=120)
        with pytest.raises(grpc.RpcError) as info:
            stub.ComputeLoss(quick, timeout=0.05)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert running.result().positions == 2_000_000
        assert stub.ComputeLoss(quick, timeout=30).loss == 0.0  # still serving
    counts = server.telemetry.loss_counts()
    assert counts["mse"] == (1, 0), "the expired call was computed"
    assert counts["sparse_categorical_cross_entropy"] == (1, 0)


# --- typed errors -----------------------------------------------------------------------------

def _details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo,
                                          list[error_details_pb2.BadRequest]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    infos, bad = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            bad.append(request)
    assert len(infos) == 1
    return infos[0], bad


@pytest.mark.e2e
def _request(predictions: pb.Tensor, targets: pb.Tensor,
             loss: str = "mse") -> pb.ComputeGradientRequest:
    return pb.ComputeGradientRequest(loss=loss, predictions=predictions, targets=targets)


@pytest.mark.e2e
@pytest.mark.parametrize(("request_", "reason", "field"), [
    (_request(_tensor(np.zeros(2)), _tensor(np.zeros(2)), "nope"), "UNKNOWN_LOSS", "loss"),
    (_request(_tensor(np.zeros(2)), _tensor(np.zeros(3))), "SHAPE_MISMATCH", "targets.shape"),
    (_request(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[3], data=b"\0" * 16),
              _tensor(np.zeros(3))), "BYTE_SIZE_MISMATCH", "predictions.data"),
    (_request(_tensor(np.array([np.nan, 0.0])), _tensor(np.zeros(2))),
     "NONFINITE_INPUT", "predictions"),
    (_request(_tensor(np.full((2, 3), 1 / 3)), _tensor(np.array([0, 7])),
              "sparse_categorical_cross_entropy"), "LABEL_OUT_OF_RANGE", "targets"),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else "")
def test_errors_carry_a_google_rpc_status(
    stub: pb_grpc.LossServiceStub, request_: pb.ComputeGradientRequest, reason: str, field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeGradient(request_, timeout=30)
    err = info.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    error_info, bad = _details(err)
    assert (error_info.reason, error_info.domain) == (reason, "lossgrad")
    assert error_info.metadata["field"].startswith(field)
    assert len(bad) == 1 and len(bad[0].field_violations) == 1
    violation = bad[0].field_violations[0]
    assert violation.field == error_info.metadata["field"]
    assert violation.description and violation.description in err.details()
    trailers = dict(err.trailing_metadata())  # type: ignore[attr-defined]
    assert trailers["lossgrad-error-reason"] == reason
    assert trailers["lossgrad-error-field"] == violation.field


@pytest.mark.e2e
def test_resource_exhausted_carries_error_info(
    start: Callable[..., tuple[LossServer, str]],
) -> None:
    _, address = start(warm=False, max_elements=3)
    request = pb.ComputeLossRequest(loss="mse", predictions=_tensor(np.zeros(2)),
                                targets=_tensor(np.zeros(2)))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=30)
    error_info, bad = _details(info.value)
    assert error_info.reason == "TOO_MANY_ELEMENTS" and bad == []
