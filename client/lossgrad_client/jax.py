"""JAX adapter: a loss computed by the server as a ``jax.custom_vjp`` function.

Needs the ``jax`` extra (``pip install lossgrad-client[jax]``); ``import
lossgrad_client`` alone never imports JAX.

>>> from lossgrad_client import LossClient
>>> from lossgrad_client.jax import remote_loss
>>> huber = remote_loss(LossClient("127.0.0.1:50051"), "huber", delta=1.0)  # doctest: +SKIP
>>> grads = jax.grad(lambda w: huber(x @ w, y))(w)  # doctest: +SKIP

The forward pass makes one ComputeGradient call and keeps the gradient as the residual;
the backward pass scales it by the cotangent, which is the exact vector-Jacobian product
for every reduction (see :mod:`lossgrad_client.torch` for why "none" is exact too).
Evaluated without differentiation the call is ComputeLoss.

- Eagerly (no ``jit``) the server is called directly and errors are the client's
  :class:`lossgrad_client.LossgradError` subclasses.
- Under ``jit`` and ``vmap`` the call is a ``jax.pure_callback`` (the service is a pure
  function of its inputs), once per example under ``vmap``. An error raised inside a
  callback reaches the caller as JAX's own runtime error whose message holds the
  client's (``INVALID_ARGUMENT: targets.shape: ...``): XLA does not carry the Python
  exception across. With reduction "none" the first traced call asks the server for the
  loss's layout (``ListLosses``) to know the shape of the per-position values.
- The server differentiates w.r.t. the predictions only: differentiating w.r.t. the
  targets or the sample weights raises instead of giving a silent zero, and a second
  derivative is not available.

float16 and bfloat16 predictions travel as float32; the loss and the gradient come back
in the predictions' dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from ._client import LossClient
from .errors import InvalidArgumentError

__all__ = ["remote_loss"]

_WIRE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

LossFunction = Callable[..., jax.Array]


def remote_loss(
    client: LossClient,
    loss: str,
    *,
    reduction: str = "mean",
    allow_nonfinite: bool = False,
    timeout: float | None = None,
    **params: Any,
) -> LossFunction:
    """Return ``f(predictions, targets, sample_weight=None)``, the server's ``loss``
    as a differentiable JAX function.

    ``client`` is a :class:`lossgrad_client.LossClient`; the other arguments are those of
    :meth:`LossClient.compute_gradient`. ``f`` returns a scalar for "mean" and "sum" and
    one value per position for "none", in the predictions' dtype.
    """
    remote = _Remote(client, loss, reduction, allow_nonfinite, timeout, params)

    @jax.custom_vjp
    def value(predictions: jax.Array, targets: Any, sample_weight: Any) -> jax.Array:
        return remote.run(predictions, targets, sample_weight, gradient=False)[0]

    def forward(predictions: Any, targets: Any,
                sample_weight: Any) -> tuple[jax.Array, jax.Array]:
        for name, arg in (("targets", targets), ("sample_weight", sample_weight)):
            if any(leaf.perturbed for leaf in jax.tree_util.tree_leaves(arg)):
                raise InvalidArgumentError(
                    f"{name}: differentiated, but the server differentiates w.r.t. the "
                    f"predictions only; wrap {name} in jax.lax.stop_gradient",
                    reason="INVALID_ARGUMENT", field=name)
        loss_value, gradient = remote.run(predictions.value, _primal(targets),
                                          _primal(sample_weight), gradient=True)
        return loss_value, gradient

    def backward(gradient: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, None, None]:
        if cotangent.ndim < gradient.ndim:  # one value per row: broadcast over classes
            cotangent = cotangent[..., None]
        return (cotangent * gradient).astype(gradient.dtype), None, None

    value.defvjp(forward, backward, symbolic_zeros=True)

    def loss_function(predictions: Any, targets: Any, sample_weight: Any = None) -> jax.Array:
        return value(predictions, targets, sample_weight)

    loss_function.__name__ = f"remote_{loss}"
    loss_function.__doc__ = (f"The server's {loss!r} loss (reduction {reduction!r}) of "
                             "(predictions, targets, sample_weight=None).")
    return loss_function


class _Remote:
    """The call behind a remote loss: direct on concrete arrays, a pure_callback on
    tracers."""

    def __init__(self, client: LossClient, loss: str, reduction: str, allow_nonfinite: bool,
                 timeout: float | None, params: dict[str, Any]) -> None:
        self.client = client
        self.loss = loss
        self.reduction = reduction
        self.options = {"reduction": reduction, "allow_nonfinite": allow_nonfinite,
                        "timeout": timeout, **params}
        self._rows: bool | None = None  # class axis last (per row values); asked once
        self._lock = threading.Lock()

    def run(self, predictions: Any, targets: Any, sample_weight: Any,
            gradient: bool) -> tuple[jax.Array, jax.Array]:
        """(loss, gradient) of the call; the gradient is empty when not asked for."""
        predictions = jnp.asarray(predictions)
        if not jnp.issubdtype(predictions.dtype, jnp.floating):
            raise InvalidArgumentError(
                f"predictions.dtype: expected a float dtype, got {predictions.dtype}",
                reason="UNSUPPORTED_DTYPE", field="predictions.dtype")
        dtype = np.dtype(predictions.dtype)
        leaves = jax.tree_util.tree_leaves((predictions, targets, sample_weight))
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            loss_value, grad = self.call(predictions, targets, sample_weight, gradient, dtype)
            return jnp.asarray(loss_value), jnp.asarray(grad)
        grad_shape = predictions.shape if gradient else (0,)
        shapes = (_struct(self._loss_shape(predictions.shape), dtype), _struct(grad_shape, dtype))

        def host(p: Any, t: Any, w: Any) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
            return self.call(p, t, w, gradient, dtype)

        loss_value, grad = jax.pure_callback(host, shapes, predictions, targets, sample_weight,
                                             vmap_method="sequential")
        return loss_value, grad

    def call(self, predictions: Any, targets: Any, sample_weight: Any, gradient: bool,
             dtype: np.dtype[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Call the server with host arrays; results in ``dtype``."""
        p = np.asarray(predictions)
        if p.dtype not in _WIRE_FLOATS:
            p = p.astype(np.float32)
        t = None if targets is None else np.asarray(targets)
        w = None if sample_weight is None else np.asarray(sample_weight)
        if not gradient:
            value = self.client.compute_loss(self.loss, p, t, sample_weight=w, **self.options)
            return np.asarray(value.loss, dtype=dtype), np.empty((0,), dtype)
        result = self.client.compute_gradient(self.loss, p, t, sample_weight=w, **self.options)
        return np.asarray(result.loss, dtype=dtype), result.gradient.astype(dtype, copy=False)

    def _loss_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.reduction.lower() != "none":
            return ()
        return shape[:-1] if self._class_axis_last() else shape

    def _class_axis_last(self) -> bool:
        with self._lock:
            if self._rows is None:
                info = next((i for i in self.client.list_losses()
                             if self.loss == i.name or self.loss in i.aliases), None)
                if info is None:
                    raise InvalidArgumentError(f"loss: unknown loss {self.loss!r}",
                                               reason="UNKNOWN_LOSS", field="loss")
                self._rows = info.class_axis_last
            return self._rows


def _struct(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
    return jax.ShapeDtypeStruct(shape, dtype)  # type: ignore[no-untyped-call]


def _primal(tree: Any) -> Any:
    """The values of a pytree of CustomVJPPrimal leaves."""
    return jax.tree_util.tree_map(lambda leaf: leaf.value, tree)
