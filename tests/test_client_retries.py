"""Per-call timeouts and retries on UNAVAILABLE (gRPC service config), against real servers.

Calls do not wait for the server to be ready (gRPC's default ``wait_for_ready=False``), so a
server that is not there fails the attempt with UNAVAILABLE, which the retry policy retries.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import DeadlineExceededError, LossClient, UnavailableError
from lossgrad_client._channel import MAX_RETRIES, SERVICE_NAME, channel_settings, service_config
from replicas import Replica, free_port

pytestmark = pytest.mark.e2e

X = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
Y = np.zeros((4, 3))
# Reconnect quickly to a server that was down, so the retries, not the reconnect backoff
# (1 s by default), decide how long recovery takes.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50),
                  ("grpc.min_reconnect_backoff_ms", 50),
                  ("grpc.max_reconnect_backoff_ms", 100)]


class FailFirst(grpc.ServerInterceptor):
    """Answers the first ``failures`` calls with ``code``, as a server shutting down does."""

    def __init__(self, failures: int,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.left = failures
        self.code = code
        self.lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        with self.lock:
            fail = self.left > 0
            self.left -= fail
        if not fail:
            return continuation(handler_call_details)

        def unavailable(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(self.code, "not yet")

        return grpc.unary_unary_rpc_method_handler(unavailable)


@pytest.fixture
def replica_failing_twice() -> Iterator[Replica]:
    replica = Replica(interceptors=(FailFirst(2),))
    yield replica
    replica.stop()


def test_service_config_retries_every_method_on_unavailable() -> None:
    config = json.loads(service_config(3))
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE_NAME}]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 4
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert float(policy["initialBackoff"].rstrip("s")) > 0
    assert policy["backoffMultiplier"] > 1
    assert "retryPolicy" not in json.loads(service_config(0))["methodConfig"][0]


@pytest.mark.parametrize("retries", [-1, MAX_RETRIES + 1, 1.5, True])
def test_retries_out_of_range(retries: Any) -> None:
    with pytest.raises(ValueError, match="retries"):
        LossClient("127.0.0.1:1", retries=retries)


def test_cancelled_by_a_stopping_server_is_retried() -> None:
    """grpc/grpc#41785: calls not yet started when a server stops get CANCELLED."""
    replica = Replica(interceptors=(FailFirst(1, grpc.StatusCode.CANCELLED),))
    try:
        with LossClient(replica.address, retries=1, timeout=30) as client:
            assert client.compute_loss("mse", X, Y).positions == X.size
        assert replica.counter.count("ComputeLoss") == 2
    finally:
        replica.stop()


def test_unavailable_answers_are_retried(replica_failing_twice: Replica) -> None:
    with LossClient(replica_failing_twice.address, retries=2, timeout=30) as client:
        result = client.compute_gradient("mse", X, Y)
    assert result.gradient.tobytes() == compute("mse", X, Y).gradient.tobytes()
    assert replica_failing_twice.counter.count("ComputeGradient") == 3  # two retries


@pytest.mark.parametrize("retries", [0, 1])
def test_too_few_retries_fail_with_unavailable(replica_failing_twice: Replica,
                                               retries: int) -> None:
    with LossClient(replica_failing_twice.address, retries=retries, timeout=30) as client:
        with pytest.raises(UnavailableError) as info:
            client.compute_gradient("mse", X, Y)
    assert info.value.message == "not yet"
    assert replica_failing_twice.counter.count("ComputeGradient") == retries + 1


def test_call_succeeds_on_a_server_started_after_it_began() -> None:
    port = free_port()
    replicas: list[Replica] = []
    starter = threading.Timer(0.15, lambda: replicas.append(Replica(port)))
    with LossClient(f"127.0.0.1:{port}", timeout=30, options=FAST_RECONNECT) as client:
        began = time.monotonic()
        starter.start()
        try:
            result = client.compute_gradient("mse", X, Y)
        finally:
            starter.join()
    try:
        assert time.monotonic() - began >= 0.15
        assert result.gradient.tobytes() == compute("mse", X, Y).gradient.tobytes()
        assert replicas[0].counter.count("ComputeGradient") == 1
    finally:
        replicas[0].stop()


def test_without_retries_a_server_started_late_is_unavailable() -> None:
    port = free_port()
    with LossClient(f"127.0.0.1:{port}", retries=0, timeout=30,
                    options=FAST_RECONNECT) as client:
        with pytest.raises(UnavailableError):
            client.compute_gradient("mse", X, Y)


def test_call_survives_a_restart_on_the_same_port() -> None:
    replica = Replica()
    port = replica.port
    with LossClient(replica.address, timeout=30, options=FAST_RECONNECT) as client:
        assert client.compute_loss("mse", X, Y).loss == compute("mse", X, Y, gradient=False).loss
        replica.stop()
        replicas: list[Replica] = []
        restarter = threading.Timer(0.15, lambda: replicas.append(Replica(port)))
        restarter.start()
        try:
            result = client.compute_gradient("mse", X, Y)
        finally:
            restarter.join()
    try:
        assert result.gradient.tobytes() == compute("mse", X, Y).gradient.tobytes()
        assert replicas[0].counter.count("ComputeGradient") == 1
    finally:
        replicas[0].stop()


def test_per_call_timeout_overrides_the_clients(client: LossClient) -> None:
    big = np.zeros((1000, 1000))
    with pytest.raises(DeadlineExceededError):
        client.compute_gradient("mse", big, big, timeout=1e-6)
    assert client.compute_loss("mse", [2.0], [0.0], timeout=30).loss == 4.0


def test_options_override_the_clients_channel_arguments() -> None:
    mine = service_config(0)
    settings = channel_settings(
        "127.0.0.1:1", max_message_bytes=1024, retries=2, load_balancing="round_robin",
        options=[("grpc.service_config", mine), ("grpc.lb_policy_name", "pick_first")],
        credentials=None, root_certificates=None, private_key=None, certificate_chain=None,
        token=None)
    options = dict(settings.options)
    assert options["grpc.service_config"] == mine
    assert options["grpc.lb_policy_name"] == "pick_first"
    assert options["grpc.max_receive_message_length"] == 1024
    assert options["grpc.enable_retries"] == 1
