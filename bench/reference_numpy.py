"""Straightforward vectorised NumPy loss + gradient (mean reduction), the baseline a user
would write by hand. Math runs in the inputs' dtype; each returns (loss, gradient)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def mse(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    r = x - y
    n = x.dtype.type(x.size)
    return float(np.mean(r * r)), r * (x.dtype.type(2) / n)


def huber(x: np.ndarray, y: np.ndarray, delta: float = 1.0) -> tuple[float, np.ndarray]:
    d = x.dtype.type(delta)
    r = x - y
    a = np.abs(r)
    quadratic = a <= d
    loss = np.where(quadratic, x.dtype.type(0.5) * r * r, d * (a - x.dtype.type(0.5) * d))
    return float(np.mean(loss)), np.clip(r, -d, d) / x.dtype.type(x.size)


def bce_logits(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    # softplus(x) - x*y; its derivative is sigmoid(x) - y, sigmoid written with tanh (stable).
    loss = np.logaddexp(x.dtype.type(0), x) - x * y
    half = x.dtype.type(0.5)
    sigmoid = half * (np.tanh(half * x) + x.dtype.type(1))
    return float(np.mean(loss)), (sigmoid - y) / x.dtype.type(x.size)


def sparse_ce(x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    rows = np.arange(x.shape[0])
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = np.log(s[:, 0]) - z[rows, labels]
    grad = e / s
    grad[rows, labels] -= x.dtype.type(1)
    grad /= x.dtype.type(x.shape[0])
    return float(np.mean(loss)), grad


def dense_ce(x: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    log_p = z - np.log(s)
    loss = -(t * log_p).sum(axis=1)
    grad = (e / s) * t.sum(axis=1, keepdims=True) - t
    grad /= x.dtype.type(x.shape[0])
    return float(np.mean(loss)), grad


def kl_log(log_q: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    # KL(p || q) with log q given, PyTorch's "batchmean": sum p (log p - log q) / rows.
    n = log_q.dtype.type(log_q.shape[0])
    pos = p > 0
    terms = np.where(pos, p * (np.log(np.where(pos, p, 1)) - log_q), 0)
    return float(terms.sum() / n), -p / n


LOSSES: dict[str, Callable[..., tuple[float, np.ndarray]]] = {
    "mse": mse,
    "huber": huber,
    "bce_logits": bce_logits,
    "sparse_ce": sparse_ce,
    "dense_ce": dense_ce,
    "kl_log": kl_log,
}
