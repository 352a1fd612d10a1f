"""Readiness while ``lossgrad serve`` warms up: with an empty numba cache the kernels must
compile, and during that time the plaintext health port (which listens before warmup)
answers NOT_SERVING for ``lossgrad.v1.LossService`` and SERVING for ``""`` (alive); then
readiness turns SERVING and the service port answers.

The other half of the transitions (SERVING -> NOT_SERVING on SIGTERM while a call in flight
still completes, exit code 0) is ``test_server_shutdown.py``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lossgrad_client import LossClient
from replicas import free_port

SERVICE = "lossgrad.v1.LossService"
COMPILE_TIMEOUT_S = 300.0  # every kernel compiles: ~90 s on 2 idle cores, more when loaded
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.e2e
def test_readiness_is_not_serving_while_kernels_compile_then_serving(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    health_port = free_port()
    log = tmp_path / "stderr.log"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lossgrad", "serve", "--port", "0",
             "--health-port", str(health_port)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout
    ready: queue.Queue[tuple[float, str]] = queue.Queue()

    def read_ready_line() -> None:
        line = stdout.readline()
        ready.put((time.monotonic(), line))

    threading.Thread(target=read_ready_line, daemon=True).start()
    try:
        # Reconnect often: the port opens a few seconds after the start (imports), and
        # gRPC's default backoff (1 s growing to 120 s) could miss the whole warmup.
        options = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 200)]
        with grpc.insecure_channel(f"127.0.0.1:{health_port}", options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE),
                                 timeout=COMPILE_TIMEOUT_S, wait_for_ready=True)
            assert next(watch).status == NOT_SERVING, log.read_text()
            warming_seen = time.monotonic()
            alive = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert alive.status == SERVING
            assert ready.empty()  # the service port is not announced while warming
            assert proc.poll() is None
            assert next(watch).status == SERVING, log.read_text()
            serving_seen = time.monotonic()
            watch.cancel()
        try:
            announced, line = ready.get(timeout=60)
        except queue.Empty:
            pytest.fail(f"SERVING but no ready line; stderr:\n{log.read_text()}")
        assert line.startswith("lossgrad serving on 127.0.0.1:"), log.read_text()
        assert announced > warming_seen
        assert any(cache.rglob("*.nbi")), "the kernels were not compiled into the empty cache"
        port = int(line.rsplit(":", 1)[1])
        with LossClient(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
            result = client.compute_gradient("mse", [1.0, 3.0], [0.0, 1.0])
        assert result.loss == 2.5
        np.testing.assert_array_equal(result.gradient, [1.0, 2.0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert serving_seen > warming_seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        stdout.close()
