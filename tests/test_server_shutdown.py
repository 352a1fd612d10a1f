"""Graceful shutdown of ``lossgrad serve`` in a subprocess: on SIGTERM readiness turns
NOT_SERVING, the call in flight completes, new calls get UNAVAILABLE, and the exit code is 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 300.0  # the first start may compile every kernel
SERVICE = "lossgrad.v1.LossService"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready_port(proc: subprocess.Popen[str], log: Path) -> int:
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        line = lines.get(timeout=READY_TIMEOUT_S)
    except queue.Empty:
        pytest.fail(f"no ready line; stderr:\n{log.read_text()}")
    assert line.startswith("lossgrad serving on 127.0.0.1:"), log.read_text()
    return int(line.rsplit(":", 1)[1])


def _late_call_code(port: int) -> grpc.StatusCode:
    """The code of a new call once the server stops taking them (readiness turns
    NOT_SERVING just before)."""
    for _ in range(200):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as late:
            try:
                pb_grpc.LossServiceStub(late).ListLosses(pb.ListLossesRequest(), timeout=30)
            except grpc.RpcError as err:
                return err.code()  # type: ignore[no-any-return]
        time.sleep(0.01)
    pytest.fail("new calls were still accepted 2 s after SIGTERM")


@pytest.mark.e2e
def test_sigterm_drains_the_call_in_flight_and_exits_0(tmp_path: Path) -> None:
    health_port = _free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lossgrad", "serve", "--port", "0", "--max-workers", "2",
             "--health-port", str(health_port), "--grace", "60", "--log-format", "json",
             "--access-log", "all"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=dict(os.environ))
    try:
        port = _ready_port(proc, log)
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(2_000_000, 8))
        labels = rng.integers(0, 8, size=2_000_000)
        request = pb.ComputeGradientRequest(
            loss="sparse_categorical_cross_entropy",
            predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=logits.shape,
                                  data=logits.tobytes()),
            targets=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=labels.shape,
                              data=labels.tobytes()),
            params=pb.LossParams(from_logits=True))
        options = [("grpc.max_send_message_length", 256 << 20),
                   ("grpc.max_receive_message_length", 256 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel, \
                grpc.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
            health = health_pb2_grpc.HealthStub(health_channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.LossServiceStub(channel)
            stub.ListLosses(pb.ListLossesRequest(), timeout=60)  # connected
            # Two workers: the calls queue, and the last big one runs when ListLosses
            # (after it on the same connection, so accepted after it) is answered.
            in_flight = [stub.ComputeGradient.future(request, timeout=120) for _ in range(4)]
            stub.ListLosses(pb.ListLossesRequest(), timeout=60)
            proc.send_signal(signal.SIGTERM)
            running_at_sigterm = sum(not call.done() for call in in_flight)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            code = _late_call_code(port)
            responses = [call.result() for call in in_flight]
        assert running_at_sigterm > 0
        assert code is grpc.StatusCode.UNAVAILABLE
        for response in responses:
            assert response.positions == 2_000_000
            assert len(response.gradient.data) == logits.nbytes
        assert proc.wait(120) == 0, log.read_text()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(line["message"] == "received SIGTERM; stopping" for line in lines)
        calls = [line for line in lines if line["logger"] == "lossgrad.access"
                 and line["method"] == "ComputeGradient"]
        assert [(c["loss"], c["code"], c["elements"]) for c in calls] == \
            [("sparse_categorical_cross_entropy", "OK", 18_000_000)] * 4
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
