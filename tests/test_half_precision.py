"""float16 and bfloat16 predictions against float64 references.

Tolerances, per dtype: the gradient and per-position losses are computed in float32 and
rounded once to the half type, so each element is within 1 ulp of the half type of the
float64 value (one of its two neighbours); reduced losses carry float32 element error
(relative 1e-5). References: PyTorch float64 autograd (from the half values, widened
exactly), and an integer round-to-nearest-even written here for the rounding itself.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from lossgrad import compute
from lossgrad_client import LossClient

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# (significand bits incl. the implicit one, smallest normal exponent)
FORMATS = {F16: (11, -14), BF16: (8, -126)}


def ulp(reference: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The half type's ulp at each float64 value."""
    bits, emin = FORMATS[dtype]
    exponent = np.floor(np.log2(np.maximum(np.abs(reference), 2.0 ** emin)))
    return 2.0 ** (exponent - bits + 1)


def within_one_ulp(got: np.ndarray, reference: np.ndarray, dtype: np.dtype) -> bool:
    err = np.abs(got.astype(np.float64) - reference)
    return bool(np.all(err <= ulp(reference, dtype) + 1e-12 * np.abs(reference)))


def _torch_grad(fn, x: np.ndarray) -> tuple[float, np.ndarray]:
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    value = fn(xt)
    value.backward()
    return float(value.detach()), xt.grad.numpy()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_gradients_within_one_half_ulp_of_float64(dtype: np.dtype) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 12)).astype(dtype)
    t = rng.standard_normal((64, 12)).astype(dtype)
    y = (rng.random((64, 12)) < 0.5).astype(dtype)
    labels = rng.integers(0, 12, 64)
    t64, y64 = t.astype(np.float64), y.astype(np.float64)
    cases = [
        ("mse", t, {}, lambda z: torch.mean((z - torch.tensor(t64)) ** 2)),
        ("binary_cross_entropy", y, {"from_logits": True},
         lambda z: torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(y64))),
        ("sparse_categorical_cross_entropy", labels, {"from_logits": True},
         lambda z: torch.nn.functional.cross_entropy(z, torch.tensor(labels))),
    ]
    for loss, targets, params, fn in cases:
        result = compute(loss, x, targets, **params)
        ref_loss, ref_grad = _torch_grad(fn, x)
        assert result.gradient.dtype == dtype, loss
        assert within_one_ulp(result.gradient, ref_grad, dtype), loss
        assert math.isclose(result.loss, ref_loss, rel_tol=1e-5), loss


def _rne_bfloat16(v: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, by integer arithmetic."""
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_rounding_is_to_nearest_even(dtype: np.dtype) -> None:
    """mse's SUM gradient 2 (x - t) is exact in float32 for these values, so the half
    result must be its correctly rounded value, ties to even included."""
    rng = np.random.default_rng(11)
    x = rng.uniform(-4, 4, 5000).astype(dtype)
    t = (x.astype(np.float64) + rng.choice([1, -1], 5000) * 2.0 ** rng.integers(-9, -3, 5000)
         ).astype(dtype)
    exact = 2.0 * (x.astype(np.float64) - t.astype(np.float64))
    got = compute("mse", x, t, reduction="sum").gradient
    if dtype == F16:
        assert np.array_equal(got.view(np.uint16), exact.astype(np.float16).view(np.uint16))
    else:
        assert np.array_equal(got.view(np.uint16), _rne_bfloat16(exact))


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_per_position_losses_and_half_targets(dtype: np.dtype) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(300).astype(dtype)
    t = rng.standard_normal(300).astype(dtype)
    result = compute("huber", x, t, reduction="none")
    r = np.abs(x.astype(np.float64) - t.astype(np.float64))
    expected = np.where(r < 1.0, 0.5 * r * r, r - 0.5)
    assert result.loss.dtype == dtype
    assert within_one_ulp(result.loss, expected, dtype)


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_half_through_the_client(client: LossClient, dtype: np.dtype) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 5)).astype(dtype)
    labels = rng.integers(0, 5, 8)
    expected = compute("sparse_categorical_cross_entropy", x, labels, from_logits=True)
    for stream in (False, True):
        got = client.compute_gradient("sparse_categorical_cross_entropy", x, labels,
                                      from_logits=True, stream=stream)
        assert got.gradient.dtype == dtype
        assert np.array_equal(got.gradient.view(np.uint16), expected.gradient.view(np.uint16))
        assert got.loss == expected.loss
    infos = {info.name: info for info in client.list_losses()}
    assert {"float16", "bfloat16"} <= set(infos["mse"].predictions.dtypes)


def test_values_past_the_half_range_round_to_infinity() -> None:
    """MAPE's gradient at a zero target is 100 / (n * eps): past float16's 65504, so it
    rounds to +/-inf (IEEE), with no warning raised; bfloat16's range holds it."""
    x = np.array([1.0, -1.0, 2.0, 2.0], dtype=F16)
    y = np.array([0.0, 0.0, 2.0, 1.0], dtype=F16)
    result = compute("mape", x, y, reduction="mean")
    assert result.gradient is not None and result.gradient.dtype == F16
    assert result.gradient[0] == np.inf and result.gradient[1] == -np.inf
    assert np.isfinite(result.gradient[2:]).all()
    wide = compute("mape", x.astype(BF16), y.astype(BF16), reduction="mean")
    assert wide.gradient is not None and np.isfinite(wide.gradient.astype(np.float64)).all()
