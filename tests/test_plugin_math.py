"""The plugin math API (``lossgrad.plugin``: exp, log, log1p, softplus, sigmoid) against
NumPy in float64, in ulps of each type: the bounds their docstrings promise. Then the
example Fair plugin, which uses ``log1p``, in its compiled driver against a float64
reference and central differences, over the whole range of residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
from lossgrad.engine import run_elementwise_kernel
from lossgrad.plugin import GROUP, exp, log, log1p, sigmoid, softplus
from lossgrad.plugin import _prepare_all as prepare_all
from lossgrad.request import prepare

RNG = np.random.default_rng(11)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin"


def _compiled(fn: Callable[[float], float]) -> Any:
    """``fn`` applied over an array by a numba loop, as in a plugin's driver."""

    @numba.njit(error_model="numpy")
    def apply(a, out):  # type: ignore[no-untyped-def]
        for i in range(a.size):
            out[i] = fn(a[i])

    def run(a: np.ndarray) -> np.ndarray:
        out = np.empty_like(a)
        apply(a, out)
        return out

    return run


def _ulps(got: np.ndarray, want: np.ndarray, dtype: type) -> float:
    """Largest error in units of the last place of ``dtype`` at the reference value, over
    the references of at least the smallest normal number (smaller ones flush to 0)."""
    keep = np.abs(want) >= np.finfo(dtype).tiny
    spacing = np.spacing(np.abs(want[keep]).astype(dtype)).astype(np.float64)
    return float(np.max(np.abs(got[keep].astype(np.float64) - want[keep]) / spacing))


def _logit(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


# (function, float64 reference, argument sampler, bound float32, bound float64)
CASES: dict[str, tuple[Any, Any, Callable[[type], np.ndarray], float, float]] = {
    "exp": (exp, np.exp, lambda dt: RNG.uniform(-87.0 if dt is np.float32 else -708.0,
                                                88.0 if dt is np.float32 else 709.0,
                                                200_000), 2.0, 2.0),
    "log": (log, np.log, lambda dt: np.exp(RNG.uniform(-80.0, 80.0, 200_000)), 2.0, 2.0),
    "log1p": (log1p, np.log1p, lambda dt: np.concatenate([
        RNG.uniform(-1.0, 1.0, 100_000), np.expm1(RNG.uniform(-40.0, 80.0, 100_000))]),
        2.0, 3.0),
    "softplus": (softplus, lambda v: np.logaddexp(0.0, v),
                 lambda dt: RNG.uniform(-80.0, 80.0, 200_000), 2.0, 4.0),
    "sigmoid": (sigmoid, _logit, lambda dt: RNG.uniform(-80.0, 80.0, 200_000), 3.0, 4.0),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_within_the_documented_ulps(name: str, dtype: type) -> None:
    fn, reference, sample, bound32, bound64 = CASES[name]
    a = sample(dtype).astype(dtype)
    a = a[np.isfinite(a) & (a > -1.0)] if name == "log1p" else a
    got = _compiled(fn)(a)
    assert got.dtype == dtype  # float32 math stays float32
    with np.errstate(over="ignore"):
        want = reference(a.astype(np.float64))
    assert _ulps(got, want, dtype) <= (bound32 if dtype is np.float32 else bound64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype: type) -> None:
    inf, nan = np.inf, np.nan

    def on(fn: Any, values: list[float]) -> list[float]:
        return _compiled(fn)(np.array(values, dtype=dtype)).tolist()

    assert on(exp, [0.0, -inf, inf, -1e4, 1e4, -1e3, 1e3]) == [1.0, 0.0, inf, 0.0, inf, 0.0,
                                                               inf]
    near_max = float(dtype(math.log(float(np.finfo(dtype).max)) * (1 - 1e-6)))
    assert on(exp, [near_max])[0] == pytest.approx(math.exp(near_max), rel=1e-6)
    assert on(log, [0.0, inf, 1.0]) == [-inf, inf, 0.0] and math.isnan(on(log, [-1.0])[0])
    assert on(log1p, [0.0, -1.0, inf, 1e-30]) == [0.0, -inf, inf, pytest.approx(1e-30)]
    assert math.isnan(on(log1p, [-2.0])[0])
    assert on(softplus, [-inf, inf, 0.0]) == [0.0, inf, pytest.approx(math.log(2.0))]
    assert on(sigmoid, [-inf, inf, 0.0]) == [0.0, 1.0, 0.5]
    for fn in (exp, log, log1p, softplus, sigmoid):
        assert math.isnan(on(fn, [nan])[0])


def test_plain_python_calls_are_the_math_module() -> None:
    """Outside numba they are the ``math`` functions: an element function runs as is."""
    assert (exp(1.5), log(3.0), log1p(1e-9)) == (math.exp(1.5), math.log(3.0),
                                                 math.log1p(1e-9))
    assert softplus(2.0) == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-15)
    assert sigmoid(-3.0) == pytest.approx(1.0 / (1.0 + math.exp(3.0)), rel=1e-15)


# --- the example Fair plugin in its driver ------------------------------------------------

@pytest.fixture(scope="module")
def fair_driver() -> Any:
    """The example's driver, compiled by the loader (nothing is registered)."""
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        prepared, failed = prepare_all([metadata.EntryPoint("fair", "lossgrad_fair:LOSSES",
                                                            GROUP)])
    finally:
        sys.path.remove(str(EXAMPLE))
    assert not failed
    return prepared[0].drivers[0][0]


def _fair(driver: Any, p: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray,
                                                                       np.ndarray]:
    batch = prepare("mse", p, y, "none", None, False, {})  # the same shapes and checks
    result = run_elementwise_kernel(batch, True, driver, (p.dtype.type(c),))
    assert result.gradient is not None
    return np.asarray(result.loss), result.gradient


def fair_reference(p: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """c^2 (u - log(1 + u)), u = |r| / c, and r / (1 + u), in float64."""
    r = p.astype(np.float64) - y.astype(np.float64)
    u = np.abs(r) / c
    return c * c * (u - np.log1p(u)), r / (1.0 + u)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fair_over_the_range_of_residuals(fair_driver: Any, dtype: type) -> None:
    """Residuals from 1e-6 to 1e20 (both signs): the gradient to a few ulps, the loss
    to a few ulps of u^2 c^2 / 2 where u - log1p(u) cancels (small u), else relatively."""
    r = np.exp(RNG.uniform(math.log(1e-6), math.log(1e20), 20_000)) * RNG.choice([-1, 1],
                                                                                  20_000)
    y = RNG.standard_normal(20_000)
    p = (y + r).astype(dtype)
    y = y.astype(dtype)
    eps = float(np.finfo(dtype).eps)
    for c in (0.3, 1.0, 50.0):
        loss, grad = _fair(fair_driver, p, y, c)
        want_loss, want_grad = fair_reference(p, y, c)
        np.testing.assert_allclose(grad, want_grad, rtol=4 * eps, atol=0)
        u = np.abs(p.astype(np.float64) - y) / c
        # log1p's error (3 ulp of log1p(u) ~ u) times c^2, against a loss that may be u^2/2
        bound = 8 * eps * c * c * np.maximum(u, u * u / 2)
        assert np.all(np.abs(loss - want_loss) <= bound)
        big = u > 1.0
        np.testing.assert_allclose(loss[big], want_loss[big], rtol=8 * eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fair_gradient_matches_central_differences(fair_driver: Any, dtype: type) -> None:
    """In float64 the driver's own losses at p +- h; in float32 (where a difference of
    losses loses too many digits) the float64 driver's differences against the float32
    gradient."""
    p = RNG.standard_normal(500) * 4
    y = RNG.standard_normal(500)
    h = 1e-6
    up, _ = _fair(fair_driver, p + h, y, 0.7)
    down, _ = _fair(fair_driver, p - h, y, 0.7)
    numeric = (up - down) / (2 * h)
    _, grad = _fair(fair_driver, p.astype(dtype), y.astype(dtype), 0.7)
    tol = 1e-7 if dtype is np.float64 else 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=tol, atol=tol)
