"""PyTorch loss + gradient through autograd: leaf tensors sharing the NumPy arrays'
memory (``torch.from_numpy``), the built-in loss, ``backward()``.

A step clears the previous gradient first (``grad = None``, what
``optimizer.zero_grad()`` does by default), so each call allocates and writes a fresh
gradient, as lossgrad does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "huber": lambda x, y: F.huber_loss(x, y, delta=1.0),
    "bce_logits": F.binary_cross_entropy_with_logits,
    "sparse_ce": F.cross_entropy,
    "dense_ce": F.cross_entropy,
    "kl_log": lambda x, y: F.kl_div(x, y, reduction="batchmean"),
}


class TorchStep:
    """One reusable forward + backward of ``family`` on fixed inputs."""

    def __init__(self, family: str, x: np.ndarray, y: np.ndarray) -> None:
        self._fn = LOSSES[family]
        self._x = torch.from_numpy(x).requires_grad_(True)
        self._y = torch.from_numpy(y)

    def __call__(self) -> tuple[float, np.ndarray]:
        self._x.grad = None
        loss = self._fn(self._x, self._y)
        loss.backward()
        assert self._x.grad is not None
        return float(loss.detach()), self._x.grad.numpy()
