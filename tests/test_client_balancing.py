"""Several servers behind one client target, calls balanced per call (round_robin).

Three real replicas (the real servicer in plain grpc servers, each counting its calls) on
loopback ports; one LossClient points at all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import AsyncLossClient, LossClient
from lossgrad_client._channel import grpc_target
from replicas import Replica

pytestmark = pytest.mark.e2e

CALLS = 60
X = np.linspace(-2.0, 2.0, 20).reshape(5, 4)
Y = np.ones((5, 4))


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    servers = [Replica() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_target_strings_are_kept() -> None:
    for target in ("127.0.0.1:50051", "dns:///lossgrad-headless.ml.svc:50051",
                   "ipv4:10.0.0.1:1,10.0.0.2:2", "unix:///tmp/lossgrad.sock"):
        assert grpc_target(target) == target


def test_address_lists_become_one_multi_address_target() -> None:
    assert grpc_target(["127.0.0.1:5001", "10.0.0.2:5002"]) == "ipv4:127.0.0.1:5001,10.0.0.2:5002"
    assert grpc_target(("[::1]:5001", "[fe80::1]:5002")) == "ipv6:[::1]:5001,[fe80::1]:5002"


@pytest.mark.parametrize("target", [
    [], ["127.0.0.1"], ["localhost:5001"], ["127.0.0.1:5001", "[::1]:5002"],
    ["127.0.0.1:0"], ["127.0.0.1:http"], [5001],
])
def test_bad_address_lists(target: list[object]) -> None:
    with pytest.raises(ValueError):
        LossClient(target)  # type: ignore[arg-type]


def test_calls_spread_over_a_list_of_servers(replicas: list[Replica]) -> None:
    expected = compute("mse", X, Y)
    with LossClient([r.address for r in replicas], timeout=30) as client:
        for _ in range(CALLS):
            result = client.compute_gradient("mse", X, Y)
            assert result.gradient.tobytes() == expected.gradient.tobytes()
    counts = [r.counter.count("ComputeGradient") for r in replicas]
    assert sum(counts) == CALLS
    assert min(counts) >= 10, counts


def test_async_client_spreads_calls_too(replicas: list[Replica]) -> None:
    async def calls() -> None:
        async with AsyncLossClient([r.address for r in replicas], timeout=30) as client:
            for _ in range(CALLS):
                await client.compute_loss("mse", X, Y)

    asyncio.run(calls())
    counts = [r.counter.count("ComputeLoss") for r in replicas]
    assert sum(counts) == CALLS and min(counts) >= 10, counts


def test_pick_first_sends_every_call_to_one_server(replicas: list[Replica]) -> None:
    with LossClient([r.address for r in replicas], load_balancing="pick_first",
                    timeout=30) as client:
        for _ in range(CALLS // 2):
            client.compute_loss("mse", X, Y)
    counts = sorted(r.counter.count("ComputeLoss") for r in replicas)
    assert counts == [0, 0, CALLS // 2]


def test_dns_target(replicas: list[Replica]) -> None:
    with LossClient(f"dns:///127.0.0.1:{replicas[0].port}", timeout=30) as client:
        assert client.compute_loss("mse", X, Y).loss == compute("mse", X, Y,
                                                                 gradient=False).loss
    assert replicas[0].counter.count("ComputeLoss") == 1
