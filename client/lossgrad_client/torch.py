"""PyTorch adapter: a loss computed by the server that ``loss.backward()`` differentiates.

Needs the ``torch`` extra (``pip install lossgrad-client[torch]``); ``import
lossgrad_client`` alone never imports torch.

>>> from lossgrad_client import LossClient
>>> from lossgrad_client.torch import RemoteLoss
>>> criterion = RemoteLoss(LossClient("127.0.0.1:50051"), "huber", delta=1.0)  # doctest: +SKIP
>>> criterion(model(x), y).backward()  # doctest: +SKIP

The forward pass makes one ComputeGradient call: the server returns the loss and its
gradient w.r.t. the predictions together, so the backward pass makes no call. It only
scales that gradient by the incoming ``grad_output``, which is the exact vector-Jacobian
product for every reduction:

- "mean" and "sum" give a scalar, and the VJP is ``grad_output * gradient``;
- "none" gives one value per position, and the server's gradient is that of the sum of
  the values. A position is one element for elementwise losses and one row (the last,
  class axis) for class losses, and each value depends only on its own position's
  predictions, so the row of the Jacobian for value ``i`` is zero outside position ``i``:
  the VJP is ``grad_output[i] * gradient`` over position ``i``'s elements (broadcast over
  the class axis for class losses). That holds for weighted values too (``w_i l_i``, and
  rmse's ``sqrt(w_i) |r_i|``).

The server differentiates w.r.t. the predictions only: targets and sample weights that
require grad are refused (detach them) rather than given a silent zero gradient, and a
backward with ``create_graph=True`` (second derivatives) raises. Without grad mode or without
``requires_grad`` on the predictions, the call is ComputeLoss (no gradient computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ._aio import AsyncLossClient
from ._client import LossClient
from ._types import GradientResult, LossResult
from .errors import InvalidArgumentError

__all__ = ["AsyncRemoteLoss", "RemoteLoss"]

# float16 and bfloat16 travel as float32 (the service computes in float32/float64); the
# loss and the gradient come back in the predictions' dtype.
_WIRE_FLOATS = (torch.float32, torch.float64)
_TENSOR_ARGUMENTS = frozenset(("predictions", "targets", "sample_weight"))


class RemoteLoss(torch.nn.Module):
    """A server-side loss as an ``nn.Module``: ``RemoteLoss(client, "huber", delta=1.0)``.

    ``client`` is a :class:`lossgrad_client.LossClient`; ``loss``, ``reduction``,
    ``allow_nonfinite``, ``timeout`` and the loss's ``params`` are those of
    :meth:`LossClient.compute_gradient`. Calling it with ``(predictions, targets,
    sample_weight=None)`` returns the loss as a tensor on the predictions' device and in
    their dtype (a scalar, or per position for "none"). Predictions on another device
    (CUDA) are copied to the host for the call and the gradient back to their device.
    Errors are the client's :class:`lossgrad_client.LossgradError` subclasses.
    """

    def __init__(
        self,
        client: LossClient,
        loss: str,
        *,
        reduction: str = "mean",
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self.client = client
        self.settings = _Settings(loss, reduction, allow_nonfinite, timeout, dict(params))

    def forward(self, predictions: torch.Tensor, targets: Any,
                sample_weight: Any = None) -> torch.Tensor:
        call = _Call(predictions, targets, sample_weight)
        method = self.client.compute_gradient if call.wants_grad else self.client.compute_loss
        return call.output(method(**self.settings.arguments(call)))

    def extra_repr(self) -> str:
        return str(self.settings)


class AsyncRemoteLoss:
    """:class:`RemoteLoss` over an :class:`lossgrad_client.AsyncLossClient`, awaited:
    ``loss = await criterion(predictions, targets)``, then ``loss.backward()`` as usual.

    The call is awaited before the autograd graph is built, so a worker can overlap the
    network round trip with other work on its event loop. Not an ``nn.Module`` (a
    module's forward cannot be awaited); it holds no parameters.
    """

    def __init__(
        self,
        client: AsyncLossClient,
        loss: str,
        *,
        reduction: str = "mean",
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        **params: Any,
    ) -> None:
        self.client = client
        self.settings = _Settings(loss, reduction, allow_nonfinite, timeout, dict(params))

    async def __call__(self, predictions: torch.Tensor, targets: Any,
                       sample_weight: Any = None) -> torch.Tensor:
        call = _Call(predictions, targets, sample_weight)
        method = self.client.compute_gradient if call.wants_grad else self.client.compute_loss
        return call.output(await method(**self.settings.arguments(call)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"


@dataclass(frozen=True)
class _Settings:
    """What a remote loss sends with every call besides the tensors."""

    loss: str
    reduction: str
    allow_nonfinite: bool
    timeout: float | None
    params: dict[str, Any]

    def __post_init__(self) -> None:
        for name in _TENSOR_ARGUMENTS.intersection(self.params):
            raise InvalidArgumentError(
                f"params: unknown parameter {name!r}; the tensors are the call's arguments",
                reason="UNKNOWN_PARAMETER", field=f"params.{name}")

    def arguments(self, call: _Call) -> dict[str, Any]:
        """Keyword arguments of ``compute_gradient``/``compute_loss`` for ``call``."""
        return {"loss": self.loss, "predictions": call.predictions, "targets": call.targets,
                "sample_weight": call.sample_weight, "reduction": self.reduction,
                "allow_nonfinite": self.allow_nonfinite, "timeout": self.timeout,
                **self.params}

    def __str__(self) -> str:
        return ", ".join([repr(self.loss), f"reduction={self.reduction!r}",
                          *(f"{name}={value!r}" for name, value in self.params.items())])


class _Call:
    """One call's inputs as host arrays, and the tensor its result becomes."""

    def __init__(self, predictions: torch.Tensor, targets: Any, sample_weight: Any) -> None:
        if not isinstance(predictions, torch.Tensor):
            raise InvalidArgumentError(
                f"predictions: expected a torch.Tensor, got {type(predictions).__name__}",
                reason="INVALID_ARGUMENT", field="predictions")
        self.source = predictions
        self.wants_grad = torch.is_grad_enabled() and predictions.requires_grad
        self.predictions = _host_array(predictions, "predictions")
        self.targets = _host_array(targets, "targets")
        self.sample_weight = _host_array(sample_weight, "sample_weight")

    def output(self, result: LossResult | GradientResult) -> torch.Tensor:
        """The loss as a tensor like the predictions, attached to the autograd graph
        through the result's gradient when there is one."""
        if isinstance(result, GradientResult):
            _check_positions(result.loss, result.gradient.shape)
            out: torch.Tensor = _ServerGradient.apply(  # type: ignore[no-untyped-call]
                self.source, result.loss, result.gradient)
            return out
        return _loss_tensor(result.loss, self.source)


class _ServerGradient(torch.autograd.Function):
    """Autograd node whose backward is the server's gradient times ``grad_output``."""

    @staticmethod
    def forward(
        ctx: Any, predictions: torch.Tensor, loss: float | npt.NDArray[Any],
        gradient: npt.NDArray[Any],
    ) -> torch.Tensor:
        ctx.gradient = gradient
        ctx.like = (predictions.dtype, predictions.device)
        return _loss_tensor(loss, predictions)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # create_graph=True runs this in grad mode: the result would have to be
        # differentiable, and a constant would silently give zero second derivatives.
        if torch.is_grad_enabled():
            raise RuntimeError("lossgrad RemoteLoss: the server gives first derivatives "
                               "only; backward with create_graph=True is not supported")
        dtype, device = ctx.like
        return _vjp(ctx.gradient, grad_output, dtype, device), None, None


def _vjp(gradient: npt.NDArray[Any], grad_output: torch.Tensor, dtype: torch.dtype,
         device: torch.device) -> torch.Tensor:
    """grad_output (a scalar, or one value per position) times the server's gradient.

    The product is the one copy of the gradient on the host; it also gives autograd a
    writable tensor (the gradient views the immutable response bytes, and autograd may
    accumulate into the tensor it receives).
    """
    cotangent = grad_output.detach()
    if cotangent.dim() == 0:
        scaled = np.multiply(gradient, cotangent.item(), dtype=gradient.dtype)
    else:
        per_position = cotangent.to("cpu", _torch_dtype(gradient.dtype)).numpy()
        if per_position.ndim < gradient.ndim:  # one value per row: broadcast over classes
            per_position = per_position[..., np.newaxis]
        scaled = np.multiply(gradient, per_position, dtype=gradient.dtype)
    return torch.from_numpy(scaled).to(device=device, dtype=dtype)


def _loss_tensor(loss: float | npt.NDArray[Any], like: torch.Tensor) -> torch.Tensor:
    # torch.tensor copies: per-position values view the immutable response bytes.
    return torch.tensor(loss, dtype=like.dtype, device=like.device)


def _check_positions(loss: float | npt.NDArray[Any], shape: tuple[int, ...]) -> None:
    """Per-position values must be per element or per row of the predictions, the two
    layouts whose VJP is the scaled gradient."""
    if isinstance(loss, np.ndarray) and loss.shape not in (shape, shape[:-1]):
        raise InvalidArgumentError(
            f"reduction: per-position values of shape {list(loss.shape)} are neither per "
            f"element nor per row of predictions of shape {list(shape)}",
            reason="INVALID_ARGUMENT", field="reduction")


def _host_array(value: Any, field: str) -> Any:
    """A tensor as a host NumPy array (a view for a CPU tensor); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    if field != "predictions" and value.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            f"{field}: requires grad, but the server differentiates w.r.t. the predictions "
            f"only; pass {field}.detach()", reason="INVALID_ARGUMENT", field=field)
    value = value.detach()
    if value.is_floating_point() and value.dtype not in _WIRE_FLOATS:
        value = value.to(torch.float32)
    return value.cpu().numpy()


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.float64 if dtype == np.float64 else torch.float32
