"""The benchmark cases: a loss, its parameters and seeded inputs of a given size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SEED = 20240601


@dataclass(frozen=True)
class Case:
    """One loss at one size. ``shape`` is the predictions' shape."""

    family: str  # key into reference_numpy / reference_torch
    loss: str  # lossgrad catalog name
    shape: tuple[int, ...]
    dtype: str = "float32"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def size_label(self) -> str:
        if len(self.shape) == 2:
            return f"{self.shape[0]}×{self.shape[1]}"
        return _count(self.shape[0])


def _count(n: int) -> str:
    exponent = len(str(n)) - 1
    mantissa = n / 10**exponent
    return f"1e{exponent}" if mantissa == 1 else f"{mantissa:g}e{exponent}"


def mse(n: int, dtype: str = "float32") -> Case:
    return Case("mse", "mse", (n,), dtype)


def bce_logits(n: int) -> Case:
    return Case("bce_logits", "binary_cross_entropy", (n,), params={"from_logits": True})


def huber(n: int) -> Case:
    return Case("huber", "huber", (n,), params={"delta": 1.0})


def sparse_ce(rows: int, classes: int) -> Case:
    return Case("sparse_ce", "sparse_categorical_cross_entropy", (rows, classes),
                params={"from_logits": True})


def dense_ce(rows: int, classes: int) -> Case:
    return Case("dense_ce", "categorical_cross_entropy", (rows, classes),
                params={"from_logits": True})


def kl_log(rows: int, classes: int) -> Case:
    return Case("kl_log", "kl_divergence", (rows, classes), params={"log_predictions": True})


def inputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Seeded predictions and targets for ``case``.

    Regression: standard normal predictions and targets (Huber with delta 1 then sees
    both of its branches). BCE: standard normal logits, 0/1 targets. Sparse CE: standard
    normal logits, uniform int64 labels. Dense CE: logits and softmax-of-normal probability
    rows. KL: log-softmax rows as log q, softmax rows as p.
    """
    rng = np.random.default_rng(SEED)
    dtype = np.dtype(case.dtype)
    x = rng.standard_normal(case.shape, dtype=np.float64 if dtype == np.float64 else np.float32)
    if case.family in ("mse", "huber"):
        y = rng.standard_normal(case.shape, dtype=x.dtype)
    elif case.family == "bce_logits":
        y = (rng.random(case.shape, dtype=x.dtype) < 0.5).astype(dtype)
    elif case.family == "sparse_ce":
        y = rng.integers(0, case.shape[-1], size=case.shape[:-1], dtype=np.int64)
    elif case.family == "dense_ce":
        y = _softmax(rng.standard_normal(case.shape, dtype=x.dtype))
    elif case.family == "kl_log":
        x = np.log(_softmax(x))
        y = _softmax(rng.standard_normal(case.shape, dtype=x.dtype))
    else:
        raise ValueError(f"unknown family {case.family!r}")
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def request_bytes(x: np.ndarray, y: np.ndarray) -> int:
    return int(x.nbytes + y.nbytes)
