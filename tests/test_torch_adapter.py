"""lossgrad_client.torch.RemoteLoss against PyTorch's own losses, through a real server.

Values and vector-Jacobian products (random cotangents, so "none" is checked beyond
``.sum()``) are compared in float64 with torch.nn's losses differentiated by autograd,
and with central finite differences by ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lossgrad_client import AsyncLossClient, InvalidArgumentError, LossClient
from lossgrad_client.torch import AsyncRemoteLoss, RemoteLoss

pytestmark = pytest.mark.e2e

REDUCTIONS = ("mean", "sum", "none")
F64 = torch.float64


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def _kl_rows(x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    # KLDivLoss is per element; the service's positions are rows (batchmean on 2-D).
    return _reduce(F.kl_div(x, y, reduction="none").sum(dim=-1), reduction)


@dataclass(frozen=True)
class Case:
    """A service loss and the PyTorch loss it matches, on generated float64 inputs."""

    loss: str
    params: dict[str, Any]
    torch_loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    make: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    id: str = field(default="")


def _values(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)


def _binary(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (3 * torch.randn(6, 5, generator=g, dtype=F64),
            torch.randint(0, 2, (6, 5), generator=g).to(F64))


def _probabilities(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.rand(6, 5, generator=g, dtype=F64) * 0.98 + 0.01,
            torch.randint(0, 2, (6, 5), generator=g).to(F64))


def _classes(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (3 * torch.randn(6, 4, generator=g, dtype=F64),
            torch.randint(0, 4, (6,), generator=g))


def _class_rows(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (3 * torch.randn(6, 4, generator=g, dtype=F64),
            torch.softmax(torch.randn(6, 4, generator=g, dtype=F64), dim=-1))


def _log_rows(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _class_rows(g)
    return torch.log_softmax(x, dim=-1), y


CLASS_WEIGHT = [0.5, 1.0, 2.0, 1.5]
CASES = [
    Case("huber", {"delta": 0.5},
         lambda x, y, r: torch.nn.HuberLoss(reduction=r, delta=0.5)(x, y), _values),
    Case("mse", {}, lambda x, y, r: torch.nn.MSELoss(reduction=r)(x, y), _values),
    Case("mae", {}, lambda x, y, r: torch.nn.L1Loss(reduction=r)(x, y), _values),
    Case("binary_cross_entropy", {"from_logits": True, "pos_weight": 2.0},
         lambda x, y, r: torch.nn.BCEWithLogitsLoss(
             reduction=r, pos_weight=torch.tensor(2.0, dtype=F64))(x, y), _binary),
    Case("binary_cross_entropy", {},
         lambda x, y, r: torch.nn.BCELoss(reduction=r)(x, y), _probabilities),
    Case("sparse_categorical_cross_entropy",
         {"from_logits": True, "class_weight": CLASS_WEIGHT, "label_smoothing": 0.1},
         lambda x, y, r: torch.nn.CrossEntropyLoss(
             weight=torch.tensor(CLASS_WEIGHT, dtype=F64), reduction=r,
             label_smoothing=0.1)(x, y), _classes),
    Case("categorical_cross_entropy", {"from_logits": True},
         lambda x, y, r: torch.nn.CrossEntropyLoss(reduction=r)(x, y), _class_rows),
    Case("kl_divergence", {"log_predictions": True}, _kl_rows, _log_rows),
]


def _case_id(case: Case) -> str:
    return case.loss + "".join(f"-{k}" for k in case.params)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_value_and_vjp_equal_torch(client: LossClient, case: Case, reduction: str) -> None:
    g = torch.Generator().manual_seed(7)
    x, y = case.make(g)
    x.requires_grad_(True)
    remote = RemoteLoss(client, case.loss, reduction=reduction, **case.params)(x, y)
    local = case.torch_loss(x, y, reduction)
    assert remote.dtype == F64 and remote.shape == local.shape
    torch.testing.assert_close(remote.detach(), local.detach(), rtol=1e-12, atol=1e-12)
    cotangent = torch.randn(local.shape, generator=g, dtype=F64)
    (remote_vjp,) = torch.autograd.grad(remote, x, cotangent)
    (local_vjp,) = torch.autograd.grad(local, x, cotangent)
    torch.testing.assert_close(remote_vjp, local_vjp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("loss", "params", "reduction", "make"), [
    ("huber", {"delta": 2.0}, "mean", _values),
    ("pseudo_huber", {"delta": 0.7}, "none", _values),
    ("sparse_categorical_cross_entropy", {"from_logits": True}, "none", _classes),
    ("categorical_cross_entropy", {"from_logits": True, "label_smoothing": 0.2}, "sum",
     _class_rows),
    ("rmse", {}, "mean", _values),
])
def test_gradcheck_central_differences(client: LossClient, loss: str, params: dict[str, Any],
                                       reduction: str, make: Any) -> None:
    x, y = make(torch.Generator().manual_seed(3))
    x = x[:3].clone().requires_grad_(True)
    criterion = RemoteLoss(client, loss, reduction=reduction, **params)
    assert torch.autograd.gradcheck(lambda p: criterion(p, y[:3]), (x,), eps=1e-6, atol=1e-7)


def test_sample_weight_matches_weighted_torch_loss(client: LossClient) -> None:
    x, y = _values(torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0], dtype=F64)
    remote = RemoteLoss(client, "huber", delta=0.5)(x, y, w)
    per_element = torch.nn.HuberLoss(reduction="none", delta=0.5)(x, y)
    local = (w[:, None] * per_element).sum() / (w.sum() * x.shape[1])
    torch.testing.assert_close(remote.detach(), local.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(remote, x)[0], torch.autograd.grad(local, x)[0],
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_of_loss_and_gradient_follow_predictions(client: LossClient,
                                                       dtype: torch.dtype) -> None:
    x64, y64 = _classes(torch.Generator().manual_seed(2))
    x = x64.to(dtype).requires_grad_(True)
    remote = RemoteLoss(client, "sparse_categorical_cross_entropy", from_logits=True)(x, y64)
    remote.backward()
    assert remote.dtype == dtype and x.grad is not None and x.grad.dtype == dtype
    # Reference on the same rounded inputs, in float64.
    local_x = x.detach().to(F64).requires_grad_(True)
    local = F.cross_entropy(local_x, y64)
    local.backward()
    assert local_x.grad is not None
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(remote.to(F64), local.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(x.grad.to(F64), local_x.grad, rtol=tolerance, atol=tolerance)


def test_gradients_accumulate_over_backward_calls(client: LossClient) -> None:
    # The first backward leaves .grad as the tensor the node returned; the second adds
    # into it in place, which needs a writable tensor of its own.
    x, y = _values(torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    criterion = RemoteLoss(client, "mse")
    criterion(x, y).backward()
    (3.0 * criterion(x, y)).backward()
    torch.testing.assert_close(x.grad, 4.0 * 2.0 * (x - y).detach() / x.numel())


def test_non_contiguous_predictions(client: LossClient) -> None:
    base, y = _values(torch.Generator().manual_seed(11))
    base.requires_grad_(True)
    RemoteLoss(client, "huber", delta=0.5)(base.t(), y.t()).backward()  # a strided view
    remote = base.grad
    base.grad = None
    torch.nn.HuberLoss(delta=0.5)(base.t(), y.t()).backward()
    torch.testing.assert_close(remote, base.grad, rtol=1e-12, atol=1e-15)


def test_without_grad_is_a_plain_loss(client: LossClient) -> None:
    x, y = _values(torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    with torch.no_grad():
        value = RemoteLoss(client, "mse", reduction="none")(x, y)
    assert value.grad_fn is None and not value.requires_grad
    torch.testing.assert_close(value, ((x - y) ** 2).detach(), rtol=1e-12, atol=0)


def test_second_derivative_raises(client: LossClient) -> None:
    x, y = _values(torch.Generator().manual_seed(6))
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(RemoteLoss(client, "mse")(x, y), x, create_graph=True)


@pytest.mark.parametrize("name", ["targets", "sample_weight"])
def test_inputs_that_require_grad_besides_predictions_are_refused(client: LossClient,
                                                                  name: str) -> None:
    x, y = _values(torch.Generator().manual_seed(8))
    w = torch.ones(6, dtype=F64)
    (y if name == "targets" else w).requires_grad_(True)
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "mse")(x.requires_grad_(True), y, w)
    assert info.value.field == name and f"{name}.detach()" in str(info.value)


def test_server_errors_are_the_clients_typed_exceptions(client: LossClient) -> None:
    x = torch.zeros(4, 3, dtype=F64, requires_grad=True)
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "mse")(x, torch.zeros(4, 2, dtype=F64))
    assert (info.value.reason, info.value.field) == ("SHAPE_MISMATCH", "targets.shape")
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "no_such_loss")(x, x.detach())
    assert info.value.reason == "UNKNOWN_LOSS"
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "huber", delta=-1.0)(x, x.detach())
    assert info.value.field == "params.delta"
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "mse")(x.detach().numpy(), x.detach())  # type: ignore[arg-type]
    assert info.value.field == "predictions"
    with pytest.raises(InvalidArgumentError) as info:
        RemoteLoss(client, "mse", targets=x)
    assert (info.value.reason, info.value.field) == ("UNKNOWN_PARAMETER", "params.targets")


def test_training_loop_converges(client: LossClient) -> None:
    torch.manual_seed(0)
    features = torch.randn(256, 8)
    labels = (features @ torch.randn(8, 3)).argmax(dim=1)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = RemoteLoss(client, "sparse_categorical_cross_entropy", from_logits=True)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = criterion(model(features), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # 3 balanced classes: about log(3) = 1.10 at the random start; separable data.
    assert losses[0] > 0.8 and losses[-1] < 0.35, losses[::10]
    accuracy = (model(features).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_module_parameter_gradients_equal_torch(client: LossClient) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.to(F64)
    x, y = torch.randn(32, 4, dtype=F64), torch.randn(32, 1, dtype=F64)
    RemoteLoss(client, "huber", delta=0.3)(model(x), y).backward()
    remote = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.nn.HuberLoss(delta=0.3)(model(x), y).backward()
    local = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(remote) == len(local) == 4
    for a, b in zip(remote, local, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_async_remote_loss_equals_blocking(client: LossClient, server_address: str) -> None:
    x, y = _classes(torch.Generator().manual_seed(9))
    x.requires_grad_(True)

    async def run() -> torch.Tensor:
        async with AsyncLossClient(server_address, timeout=60.0) as async_client:
            criterion = AsyncRemoteLoss(async_client, "sparse_categorical_cross_entropy",
                                        from_logits=True, reduction="none")
            return await criterion(x, y)

    remote = asyncio.run(run())
    blocking = RemoteLoss(client, "sparse_categorical_cross_entropy", from_logits=True,
                          reduction="none")(x, y)
    torch.testing.assert_close(remote, blocking, rtol=0, atol=0)
    cotangent = torch.linspace(-1, 1, 6, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad(remote, x, cotangent)[0],
                               torch.autograd.grad(blocking, x, cotangent)[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_predictions_get_their_gradient_on_the_device(client: LossClient) -> None:
    x, y = _values(torch.Generator().manual_seed(10))
    x_cuda = x.cuda().requires_grad_(True)
    remote = RemoteLoss(client, "huber")(x_cuda, y.cuda())
    remote.backward()
    assert remote.device == x_cuda.device and x_cuda.grad is not None
    assert x_cuda.grad.device == x_cuda.device
    xl = x.clone().requires_grad_(True)
    torch.nn.HuberLoss()(xl, y).backward()
    torch.testing.assert_close(x_cuda.grad.cpu(), xl.grad)


def test_repr_names_the_loss(client: LossClient) -> None:
    assert repr(RemoteLoss(client, "huber", delta=0.5)) == (
        "RemoteLoss('huber', reduction='mean', delta=0.5)")


def test_client_package_imports_neither_torch_nor_jax() -> None:
    code = ("import sys, lossgrad_client; "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
