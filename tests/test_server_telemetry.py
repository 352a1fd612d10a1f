"""Prometheus metrics on their own HTTP port, scraped and parsed; one access log line per
call with its request id, as text or JSON."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import lossgrad
import numpy as np
import pytest
from lossgrad.server import LossServer, create_server
from lossgrad.telemetry import JsonFormatter
from lossgrad_client import InvalidArgumentError, LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def served() -> Iterator[tuple[LossServer, str]]:
    server, port = create_server("127.0.0.1", 0, metrics_port=0)
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait(30)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.e2e
def test_metrics_count_calls_errors_elements_and_latency(
    served: tuple[LossServer, str],
) -> None:
    server, address = served
    assert server.metrics_port is not None
    with LossClient(address, timeout=30) as client:
        for _ in range(3):
            client.compute_gradient("l2", np.zeros((4, 5), np.float32),  # an alias of mse
                                    np.zeros((4, 5), np.float32))
        with pytest.raises(InvalidArgumentError):
            client.compute_loss("mse", [1.0, 2.0], [1.0])
        client.list_losses()
    samples = _scrape(server.metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    grad = {"method": "ComputeGradient", "loss": "mse"}
    assert value("lossgrad_requests_total", code="OK", **grad) == 3
    assert value("lossgrad_elements_total", **grad) == 3 * 40
    assert value("lossgrad_tensor_bytes_total", **grad) == 3 * 40 * 4
    assert value("lossgrad_request_duration_seconds_count", **grad) == 3
    assert value("lossgrad_request_duration_seconds_sum", **grad) > 0
    bad = {"method": "ComputeLoss", "loss": "mse", "code": "INVALID_ARGUMENT"}
    assert value("lossgrad_requests_total", **bad) == 1
    assert value("lossgrad_request_errors_total", **bad) == 1
    assert value("lossgrad_requests_total", method="ListLosses", loss="", code="OK") == 1
    assert value("lossgrad_in_flight_requests", method="ComputeGradient") == 0
    assert server.telemetry.loss_counts() == {"mse": (4, 1)}


def test_the_metrics_port_closes_on_stop() -> None:
    server, _ = create_server("127.0.0.1", 0, warm=False, metrics_port=0)
    port = server.metrics_port
    assert port is not None and _scrape(port)
    server.stop(0).wait(30)
    with pytest.raises(OSError):
        _scrape(port)


@pytest.mark.e2e
def test_one_access_log_line_per_call_with_the_request_id(
    served: tuple[LossServer, str], caplog: pytest.LogCaptureFixture,
) -> None:
    _, address = served
    with caplog.at_level(logging.INFO, logger="lossgrad.access"), \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        _, call = stub.ListLosses.with_call(pb.ListLossesRequest(), timeout=30,
                                            metadata=(("x-request-id", "abc-123"),))
        assert ("x-request-id", "abc-123") in call.trailing_metadata()
        _, call = stub.ListLosses.with_call(pb.ListLossesRequest(), timeout=30)
        generated = dict(call.trailing_metadata())["x-request-id"]
    records = [r for r in caplog.records if r.name == "lossgrad.access"]
    assert len(records) == 2
    fields = [r.fields for r in records]  # type: ignore[attr-defined]
    assert fields[0]["request_id"] == "abc-123"
    assert fields[1]["request_id"] == generated and len(generated) == 32
    assert fields[0]["method"] == "ListLosses" and fields[0]["code"] == "OK"
    assert fields[0]["elapsed_ms"] >= 0 and fields[0]["elements"] == 0
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "abc-123" and line["logger"] == "lossgrad.access"
    assert line["level"] == "INFO" and line["time"].endswith("Z")
    assert "abc-123" in records[0].getMessage()


@pytest.mark.e2e
def test_get_server_info(served: tuple[LossServer, str]) -> None:
    _, address = served
    with LossClient(address, timeout=30) as client:
        client.compute_loss("l1", [1.0], [0.0])
        client.compute_gradient("mae", [1.0], [0.0])
        with pytest.raises(InvalidArgumentError):
            client.compute_loss("huber", [1.0], [0.0], delta=-1.0)
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.LossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=30)
    assert info.version == lossgrad.__version__
    assert list(info.supported_dtypes) == [pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT64,
                                           pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64,
                                           pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16]
    assert info.limits.max_message_bytes == 256 * 1024 * 1024
    assert (info.limits.max_elements, info.limits.max_concurrent_rpcs) == (0, 0)
    assert info.features.reflection and info.features.metrics
    assert not (info.features.tls or info.features.mutual_tls or info.features.auth)
    assert [(s.loss, s.calls, s.failed_calls) for s in info.loss_statistics] == \
        [("huber", 1, 1), ("mae", 2, 0)]


@pytest.mark.e2e
def test_get_server_info_reports_the_configuration() -> None:
    server, port = create_server("127.0.0.1", 0, warm=False, max_elements=10,
                                 max_concurrent_rpcs=7, max_message_bytes=1 << 20,
                                 reflection=False, auth_token="t")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.LossServiceStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=30, metadata=(("authorization", "Bearer t"),))
    finally:
        server.stop(0).wait(30)
    assert (info.limits.max_message_bytes, info.limits.max_elements,
            info.limits.max_concurrent_rpcs) == (1 << 20, 10, 7)
    assert info.features.auth and not info.features.reflection and not info.features.metrics
    assert list(info.loss_statistics) == []


@pytest.mark.e2e
def test_request_id_comes_back_with_an_error_status_too(served: tuple[LossServer, str]) -> None:
    _, address = served
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeLoss(pb.ComputeLossRequest(loss="mse"), timeout=30,
                             metadata=(("x-request-id", "err-42"),))
    trailing = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert trailing["x-request-id"] == "err-42"
    assert trailing["lossgrad-error-reason"] == "MISSING_FIELD"  # no predictions were sent


@pytest.mark.e2e
def test_a_stream_is_one_observed_call(served: tuple[LossServer, str],
                                       caplog: pytest.LogCaptureFixture) -> None:
    """ComputeStream calls are counted, timed and logged once each, by the loss of their
    header, with the elements of every chunk (both passes); GetServerInfo counts them."""
    server, address = served
    assert server.metrics_port is not None
    x = np.zeros((4, 5), np.float32)
    logits = np.zeros((6, 3), np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    with caplog.at_level(logging.INFO, logger="lossgrad.access"), \
            LossClient(address, timeout=30, stream_chunk_bytes=48) as client:
        client.compute_gradient("l2", x, x, stream=True)  # 2 rows a chunk: 2 chunks
        client.compute_gradient("sparse_categorical_cross_entropy", logits, labels,
                                stream=True, ignore_index=1)  # a weight pass first
        with pytest.raises(InvalidArgumentError):
            client.compute_loss("sparse_categorical_cross_entropy", logits, labels + 1,
                                stream=True)
    samples = _scrape(server.metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    mse = {"method": "ComputeStream", "loss": "mse"}
    sce = {"method": "ComputeStream", "loss": "sparse_categorical_cross_entropy"}
    assert value("lossgrad_requests_total", code="OK", **mse) == 1
    assert value("lossgrad_elements_total", **mse) == 40
    assert value("lossgrad_tensor_bytes_total", **mse) == 160
    assert value("lossgrad_request_duration_seconds_count", **mse) == 1
    assert value("lossgrad_requests_total", code="OK", **sce) == 1
    assert value("lossgrad_requests_total", code="INVALID_ARGUMENT", **sce) == 1
    assert value("lossgrad_request_errors_total", code="INVALID_ARGUMENT", **sce) == 1
    # The OK call: labels in the weight pass, then logits and labels (30). The failed one
    # stops at the label out of range, in its second chunk: its first (2 rows: 8
    # elements) and what the server had read ahead of it are counted.
    assert 30 + 8 <= value("lossgrad_elements_total", **sce) <= 30 + 24
    assert value("lossgrad_in_flight_requests", method="ComputeStream") == 0
    assert server.telemetry.loss_counts() == {"mse": (1, 0),
                                              "sparse_categorical_cross_entropy": (2, 1)}
    lines = [r.fields for r in caplog.records  # type: ignore[attr-defined]
             if r.name == "lossgrad.access"]
    assert [(f["method"], f["loss"], f["code"]) for f in lines] == [
        ("ComputeStream", "mse", "OK"),
        ("ComputeStream", "sparse_categorical_cross_entropy", "OK"),
        ("ComputeStream", "sparse_categorical_cross_entropy", "INVALID_ARGUMENT")]
    assert lines[0]["elements"] == 40 and len(lines[0]["request_id"]) == 32


CANCELLED_STREAMS = 20  # gRPC may end a cancelled call's messages before it says why


@pytest.mark.e2e
def test_a_cancelled_stream_is_counted_as_cancelled(
        served: tuple[LossServer, str], caplog: pytest.LogCaptureFixture) -> None:
    """A client that cancels a stream after the header is no server error: CANCELLED in
    the metrics and the access line, nothing logged as a failure of the server. Several
    times: the server may see the stream's messages end before gRPC reports the
    cancellation, which must not make it a stream that ended early (INVALID_ARGUMENT)."""
    server, address = served
    header = pb.ComputeStreamHeader(
        loss="mse", gradient=True,
        predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[100, 10]),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[100, 10]))

    with caplog.at_level(logging.INFO), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        for n in range(1, CANCELLED_STREAMS + 1):
            release = threading.Event()

            def requests(release: threading.Event = release
                         ) -> Iterator[pb.ComputeStreamRequest]:
                yield pb.ComputeStreamRequest(header=header)
                release.wait(30)

            call = stub.ComputeStream(requests(), timeout=30)
            assert next(call).ready.block_rows > 0
            call.cancel()
            release.set()
            for _ in range(300):  # the server notices on its own threads
                if server.telemetry.loss_counts().get("mse", (0, 0))[0] >= n:
                    break
                time.sleep(0.01)
    assert server.telemetry.loss_counts() == {"mse": (CANCELLED_STREAMS, CANCELLED_STREAMS)}
    access = [r for r in caplog.records if r.name == "lossgrad.access"]
    assert [r.fields["code"] for r in access] == ["CANCELLED"] * CANCELLED_STREAMS  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
