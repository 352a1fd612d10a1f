"""lossgrad_client.jax.remote_loss against jax.grad of jnp formulas, through a real server.

The references are written here in jax.numpy from the losses' definitions and
differentiated by JAX itself; JAX runs in float32 (its default), so values and
gradients agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (the test extra pins it)")
import jax.numpy as jnp  # noqa: E402
from lossgrad_client import InvalidArgumentError, LossClient  # noqa: E402
from lossgrad_client.jax import remote_loss  # noqa: E402

pytestmark = pytest.mark.e2e

TOLERANCE = {"rtol": 2e-6, "atol": 1e-7}


def _huber(x: jax.Array, y: jax.Array, delta: float = 1.0) -> jax.Array:
    r = jnp.abs(x - y)
    return jnp.where(r < delta, 0.5 * r**2, delta * (r - 0.5 * delta))


def _sparse_ce(x: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), y[..., None], axis=-1)[..., 0]


def _bce_logits(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.logaddexp(0.0, x) - y * x


def _reduce(values: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def _inputs(loss: str, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(2 * rng.normal(size=(6, 4)), jnp.float32)
    if loss == "sparse_categorical_cross_entropy":
        return x, jnp.asarray(rng.integers(0, 4, size=6), jnp.int32)
    if loss == "binary_cross_entropy":
        return x, jnp.asarray(rng.integers(0, 2, size=(6, 4)), jnp.float32)
    return x, jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)


CASES: list[tuple[str, dict[str, Any], Callable[..., jax.Array]]] = [
    ("huber", {"delta": 0.5}, lambda x, y: _huber(x, y, 0.5)),
    ("mse", {}, lambda x, y: (x - y) ** 2),
    ("binary_cross_entropy", {"from_logits": True}, _bce_logits),
    ("sparse_categorical_cross_entropy", {"from_logits": True}, _sparse_ce),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("loss", "params", "reference"), CASES, ids=[c[0] for c in CASES])
def test_value_and_vjp_equal_jax_reference(client: LossClient, loss: str,
                                           params: dict[str, Any],
                                           reference: Callable[..., jax.Array],
                                           reduction: str) -> None:
    x, y = _inputs(loss)
    f = remote_loss(client, loss, reduction=reduction, **params)
    value, vjp = jax.vjp(lambda p: f(p, y), x)
    expected, expected_vjp = jax.vjp(lambda p: _reduce(reference(p, y), reduction), x)
    assert value.shape == expected.shape and value.dtype == jnp.float32
    np.testing.assert_allclose(value, expected, **TOLERANCE)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=expected.shape), jnp.float32)
    np.testing.assert_allclose(vjp(cotangent)[0], expected_vjp(cotangent)[0], **TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_jit_and_vmap(client: LossClient, reduction: str) -> None:
    loss = "sparse_categorical_cross_entropy"
    x, y = _inputs(loss, seed=2)
    f = remote_loss(client, loss, from_logits=True, reduction=reduction)

    def total(p: jax.Array, t: jax.Array) -> jax.Array:
        return f(p, t).sum()

    def local(p: jax.Array, t: jax.Array) -> jax.Array:
        return _reduce(_sparse_ce(p, t), reduction).sum()

    value, grad = jax.jit(jax.value_and_grad(total))(x, y)
    expected, expected_grad = jax.value_and_grad(local)(x, y)
    np.testing.assert_allclose(value, expected, **TOLERANCE)
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE)
    np.testing.assert_allclose(jax.jit(f)(x, y), _reduce(_sparse_ce(x, y), reduction),
                               **TOLERANCE)
    # vmap: one call per example, each reduced on its own (batches of 2 rows).
    batched = jax.vmap(jax.grad(total))(x.reshape(3, 2, 4), y.reshape(3, 2))
    np.testing.assert_allclose(
        batched, jax.vmap(jax.grad(local))(x.reshape(3, 2, 4), y.reshape(3, 2)), **TOLERANCE)


def test_sample_weight(client: LossClient) -> None:
    x, y = _inputs("huber", seed=3)
    w = jnp.asarray([0.0, 1.0, 2.0, 0.5, 3.0, 1.0], jnp.float32)
    f = remote_loss(client, "huber", delta=0.5)

    def local(p: jax.Array) -> jax.Array:
        return (w[:, None] * _huber(p, y, 0.5)).sum() / (w.sum() * p.shape[1])

    value, grad = jax.value_and_grad(lambda p: f(p, y, w))(x)
    np.testing.assert_allclose(value, local(x), **TOLERANCE)
    np.testing.assert_allclose(grad, jax.grad(local)(x), **TOLERANCE)


def test_bfloat16_predictions_keep_their_dtype(client: LossClient) -> None:
    x, y = _inputs("mse", seed=4)
    xb = x.astype(jnp.bfloat16)
    value, grad = jax.value_and_grad(lambda p: remote_loss(client, "mse")(p, y))(xb)
    assert value.dtype == grad.dtype == jnp.bfloat16
    x32 = xb.astype(jnp.float32)
    np.testing.assert_allclose(grad.astype(jnp.float32), 2 * (x32 - y) / x.size, rtol=1e-2)


def test_errors(client: LossClient) -> None:
    x, _ = _inputs("mse")
    f = remote_loss(client, "mse")
    # Eagerly: the client's typed exception.
    with pytest.raises(InvalidArgumentError) as info:
        jax.grad(lambda p: f(p, jnp.zeros((6, 3))))(x)
    assert (info.value.reason, info.value.field) == ("SHAPE_MISMATCH", "targets.shape")
    # Under jit: JAX's runtime error carrying the client's message.
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT: targets.shape"):
        jax.jit(jax.grad(lambda p: f(p, jnp.zeros((6, 3)))))(x)
    # Differentiating w.r.t. the targets is refused, not answered with a zero.
    with pytest.raises(InvalidArgumentError) as info:
        jax.grad(f, argnums=1)(x, x)
    assert info.value.field == "targets"
    with pytest.raises(InvalidArgumentError) as info:
        jax.jit(remote_loss(client, "no_such_loss", reduction="none"))(x, x)
    assert info.value.reason == "UNKNOWN_LOSS"


def test_training_loop_converges(client: LossClient) -> None:
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
    labels = jnp.asarray((features @ rng.normal(size=(8, 1)))[:, 0] > 0, jnp.float32)
    f = remote_loss(client, "binary_cross_entropy", from_logits=True)

    @jax.jit
    def step(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        value, grad = jax.value_and_grad(lambda v: f(features @ v, labels))(w)
        return value, w - 2.0 * grad

    w = jnp.zeros(8, jnp.float32)
    losses = []
    for _ in range(30):
        value, w = step(w)
        losses.append(float(value))
    assert losses[0] == pytest.approx(np.log(2), rel=1e-6)  # zero logits
    assert losses[-1] < 0.25, losses[::10]
