"""AsyncLossClient against the session's real server: the same results as LossClient (bit
for bit) and the same errors. Coroutines run with ``asyncio.run`` in plain tests."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import (
    AsyncLossClient,
    DeadlineExceededError,
    InvalidArgumentError,
    LossClient,
    UnavailableError,
)
from replicas import free_port

pytestmark = pytest.mark.e2e

RNG = np.random.default_rng(7)
LOGITS = RNG.normal(size=(16, 5)).astype(np.float32)
LABELS = RNG.integers(0, 5, 16)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_gradient_and_loss_match_the_blocking_client(
        server_address: str, client: LossClient) -> None:
    async def calls() -> tuple[Any, Any]:
        async with AsyncLossClient(server_address, timeout=60) as aclient:
            gradient = await aclient.compute_gradient(
                "sparse_categorical_cross_entropy", LOGITS, LABELS, from_logits=True,
                label_smoothing=0.1)
            losses = await aclient.compute_loss("mse", LOGITS, LOGITS * 0.5, reduction="none")
            return gradient, losses

    gradient, losses = run(calls())
    expected = client.compute_gradient("sparse_categorical_cross_entropy", LOGITS, LABELS,
                                       from_logits=True, label_smoothing=0.1)
    assert (gradient.loss, gradient.positions, gradient.weight_sum) == (
        expected.loss, expected.positions, expected.weight_sum)
    assert gradient.gradient.tobytes() == expected.gradient.tobytes()
    assert gradient.gradient.dtype == np.float32 and not gradient.gradient.flags.writeable
    reference = compute("mse", LOGITS, LOGITS * 0.5, reduction="none", gradient=False)
    assert losses.loss.tobytes() == reference.loss.tobytes()
    assert losses.positions == LOGITS.size


def test_list_losses_matches_the_blocking_client(server_address: str,
                                                 client: LossClient) -> None:
    async def catalog() -> Any:
        async with AsyncLossClient(server_address) as aclient:
            return await aclient.list_losses(timeout=30)

    assert run(catalog()) == client.list_losses()


def test_concurrent_calls_on_one_client(server_address: str) -> None:
    inputs = [RNG.normal(size=(8, 3)) for _ in range(12)]

    async def many() -> list[Any]:
        async with AsyncLossClient(server_address, timeout=60) as aclient:
            return list(await asyncio.gather(
                *(aclient.compute_gradient("huber", x, x * 0.0, delta=0.5) for x in inputs)))

    for x, result in zip(inputs, run(many()), strict=True):
        reference = compute("huber", x, x * 0.0, delta=0.5)
        assert result.loss == reference.loss
        assert result.gradient.tobytes() == reference.gradient.tobytes()


def test_server_errors_are_typed(server_address: str) -> None:
    async def bad() -> None:
        async with AsyncLossClient(server_address, timeout=30) as aclient:
            await aclient.compute_loss("cross_entropy", [1.0], [1.0])

    with pytest.raises(InvalidArgumentError) as info:
        run(bad())
    assert info.value.reason == "UNKNOWN_LOSS" and info.value.field == "loss"
    assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)


def test_client_side_errors_need_no_server() -> None:
    async def bad() -> None:
        async with AsyncLossClient(f"127.0.0.1:{free_port()}") as aclient:
            await aclient.compute_loss("mse", [1.0], [1.0], reduction="average")

    with pytest.raises(InvalidArgumentError) as info:
        run(bad())
    assert info.value.field == "reduction" and info.value.__cause__ is None


def test_per_call_timeout_overrides_the_clients(server_address: str) -> None:
    big = np.zeros((1000, 1000))

    async def late() -> None:
        async with AsyncLossClient(server_address, timeout=60) as aclient:
            await aclient.compute_gradient("mse", big, big, timeout=1e-6)

    with pytest.raises(DeadlineExceededError) as info:
        run(late())
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_unreachable_server_is_unavailable() -> None:
    async def nowhere() -> None:
        async with AsyncLossClient(f"127.0.0.1:{free_port()}", retries=0,
                                   timeout=10) as aclient:
            await aclient.list_losses()

    with pytest.raises(UnavailableError):
        run(nowhere())
