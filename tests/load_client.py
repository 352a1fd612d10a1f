"""One client process of the loopback load test (``test_load_processes.py``).

``python load_client.py ADDRESS SEED CALLS`` makes CALLS compute_gradient calls of mixed
losses through one LossClient, checks every loss and gradient against a float64 NumPy
reference computed here (apart from the server's kernels), and prints a JSON summary:
calls, failed, mismatches, calls by loss, the first few problems and the seconds taken.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from lossgrad_client import LossClient

Case = tuple[str, np.ndarray, np.ndarray, dict[str, Any], float, np.ndarray]


def mse(rng: np.random.Generator, dtype: type) -> Case:
    p, y = rng.normal(size=(16, 4)).astype(dtype), rng.normal(size=(16, 4)).astype(dtype)
    r = p.astype(np.float64) - y
    return "mse", p, y, {}, float(np.mean(r * r)), 2 * r / r.size


def huber(rng: np.random.Generator, dtype: type) -> Case:
    p, y = (rng.normal(size=64) * 3).astype(dtype), rng.normal(size=64).astype(dtype)
    delta = float(rng.uniform(0.5, 2.0))
    r = p.astype(np.float64) - y
    small = np.abs(r) <= delta
    losses = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return "huber", p, y, {"delta": delta}, float(losses.mean()), grad / r.size


def sparse_ce(rng: np.random.Generator, dtype: type) -> Case:
    z = (rng.normal(size=(32, 10)) * 2).astype(dtype)
    labels = rng.integers(0, 10, size=32)
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_softmax)
    grad[rows, labels] -= 1.0
    return ("sparse_categorical_cross_entropy", z, labels, {"from_logits": True},
            float(-log_softmax[rows, labels].mean()), grad / len(labels))


def bce_logits(rng: np.random.Generator, dtype: type) -> Case:
    x = (rng.normal(size=48) * 3).astype(dtype)
    y = rng.integers(0, 2, size=48).astype(dtype)
    x64 = x.astype(np.float64)
    losses = np.maximum(x64, 0) - x64 * y + np.log1p(np.exp(-np.abs(x64)))
    grad = (1 / (1 + np.exp(-x64)) - y) / x.size
    alias = rng.integers(2) == 0  # the alias fixes from_logits=True
    name, params = ("sigmoid_cross_entropy", {}) if alias else (
        "binary_cross_entropy", {"from_logits": True})
    return name, x, y, params, float(losses.mean()), grad


CASES: tuple[Callable[[np.random.Generator, type], Case], ...] = (mse, huber, sparse_ce,
                                                                 bce_logits)
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}  # relative, of the result's scale


def main(address: str, seed: int, calls: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    failed = mismatches = 0
    by_loss: Counter[str] = Counter()
    problems: list[str] = []
    start = time.monotonic()
    with LossClient(address, timeout=30.0) as client:
        for i in range(calls):
            dtype = (np.float32, np.float64)[i % 2]
            name, predictions, targets, params, loss, gradient = CASES[i % len(CASES)](
                rng, dtype)
            by_loss[name] += 1
            try:
                result = client.compute_gradient(name, predictions, targets, **params)
            except Exception as err:  # counted and reported, whatever it is
                failed += 1
                problems.append(f"call {i} ({name}): {err!r}")
                continue
            rtol = TOLERANCE[dtype]
            ok = (result.gradient.dtype == dtype and result.gradient.shape == gradient.shape
                  and abs(result.loss - loss) <= rtol * max(1.0, abs(loss))
                  and np.allclose(result.gradient, gradient, rtol=rtol,
                                  atol=rtol * np.abs(gradient).max()))
            if not ok:
                mismatches += 1
                problems.append(f"call {i} ({name}, {np.dtype(dtype).name}): loss "
                                f"{result.loss!r}, expected {loss!r}")
    return {"calls": calls, "failed": failed, "mismatches": mismatches,
            "by_loss": dict(by_loss), "problems": problems[:5],
            "seconds": round(time.monotonic() - start, 3)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
