"""Diagonal Hessians of gaussian_nll (w.r.t. the mean), sigmoid_focal and softmax_focal.

As ``test_hessian.py``: each exact Hessian against float64 NumPy formulas written here
(the focal ones by the chain rule through p, not the kernels' rearranged form), against
central finite differences of the engine's own gradient, and against PyTorch's double
backward (torchvision's focal formula written in torch, torch's GaussianNLLLoss); the
clipped and constant modes against the same formulas; the gamma edge cases (0: the
alpha-weighted cross-entropy Hessian; 0 < gamma < 2 at saturated logits: bounded, the
limit 0); one call end to end through the client.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from lossgrad import compute
from lossgrad_client import LossClient

GAUSSIAN_EPS = 1e-6  # PyTorch GaussianNLLLoss: the variance is clamped to >= eps
C = 4

CASES: list[tuple[str, dict[str, Any]]] = [
    ("sigmoid_focal", {"alpha": 0.25, "gamma": 2.0}),
    ("sigmoid_focal", {"alpha": -1.0, "gamma": 0.5}),
    ("sigmoid_focal", {"alpha": 0.75, "gamma": 0.0}),
    ("sigmoid_focal", {"alpha": -1.0, "gamma": 1.5}),
    ("softmax_focal", {"alpha": 0.25, "gamma": 2.0}),
    ("softmax_focal", {"alpha": 1.0, "gamma": 0.5}),
    ("softmax_focal", {"alpha": 0.5, "gamma": 0.0}),
    ("gaussian_nll", {}),
    ("gaussian_nll", {"full": True}),
]
IDS = [f"{loss}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for loss, params in CASES]


# --- inputs -------------------------------------------------------------------------------

def make_inputs(loss: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(predictions, targets, extra keywords: the variance); soft and hard labels."""
    rng = np.random.default_rng(seed)
    if loss == "softmax_focal":
        x = rng.normal(0, 2.0, (6, C))
        q = rng.dirichlet(np.ones(C), 6)
        q[0] = np.eye(C)[1]  # one-hot rows and a confident one
        q[1] = np.eye(C)[3]
        x[1, 3] = 6.0
        return x, q, {}
    x = rng.normal(0, 2.0, (4, 5))
    if loss == "sigmoid_focal":
        y = (rng.random((4, 5)) > 0.5).astype(np.float64)
        y[0] = rng.uniform(0.05, 0.95, 5)  # soft labels
        return x, y, {}
    y = rng.normal(0, 1.0, (4, 5))
    v = rng.uniform(0.3, 2.0, (4, 5))
    v[0, :2] = (0.0, 5e-7)  # the clamp at 1e-6
    return x, y, {"variance": v}


def sample_weight(loss: str, x: np.ndarray, seed: int) -> np.ndarray:
    shape = x.shape[:-1] if loss == "softmax_focal" else x.shape
    return np.random.default_rng(seed + 100).uniform(0.2, 2.0, shape)


# --- float64 references -------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # no cancellation in either tail
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def sigmoid_focal_second(x: np.ndarray, y: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """d^2/dx^2 of alpha_t u^gamma ce, u = 1 - p_t, by the product rule: u' = (1 - 2y) s,
    u'' = (1 - 2y) s (1 - 2p), ce' = p - y, ce'' = s, s = p (1 - p). Inputs with u > 0."""
    p, q = _sigmoid(x), _sigmoid(-x)
    s = p * q
    u = p * (1 - y) + q * y
    ce = y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
    p_minus_y = p * (1 - y) - q * y
    du, d2u = (1 - 2 * y) * s, (1 - 2 * y) * s * (1 - 2 * p)
    m = u ** gamma
    dm = gamma * u ** (gamma - 1) * du
    d2m = gamma * (gamma - 1) * u ** (gamma - 2) * du ** 2 + gamma * u ** (gamma - 1) * d2u
    at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else 1.0
    return at * (d2m * ce + 2 * dm * p_minus_y + m * s)


def softmax_focal_second(x: np.ndarray, q: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """Diagonal of the dense Hessian J^T diag(f'') J + sum_k f'_k d^2 p_k of
    sum_k f_k(p_k), f_k(p) = -alpha q_k (1 - p)^gamma log p, p = softmax(x), per row."""
    out = np.empty_like(x)
    for i, (z, t) in enumerate(zip(x, q, strict=True)):
        e = np.exp(z - z.max())
        p = e / e.sum()
        o = 1 - p
        f1 = -alpha * t * (-gamma * o ** (gamma - 1) * np.log(p) + o ** gamma / p)
        f2 = -alpha * t * (gamma * (gamma - 1) * o ** (gamma - 2) * np.log(p)
                           - 2 * gamma * o ** (gamma - 1) / p - o ** gamma / p ** 2)
        jac = np.diag(p) - np.outer(p, p)  # jac[k, j] = d p_k / d x_j
        dense = jac.T @ np.diag(f2) @ jac
        for k in range(C):  # d^2 p_k / dx_a dx_b
            side = np.eye(C)[k] - p
            d2 = p[k] * np.outer(side, side) - p[k] * jac
            dense += f1[k] * d2
        out[i] = np.diag(dense)
    return out


def position_hessian(loss: str, x: np.ndarray, t: np.ndarray, params: dict[str, Any],
                     extra: dict[str, Any]) -> np.ndarray:
    if loss == "sigmoid_focal":
        return sigmoid_focal_second(x, t, params["alpha"], params["gamma"])
    if loss == "softmax_focal":
        return softmax_focal_second(x, t, params["alpha"], params["gamma"])
    return 1.0 / np.maximum(extra["variance"], GAUSSIAN_EPS)


def expected_hessian(loss: str, x: np.ndarray, t: np.ndarray, params: dict[str, Any],
                     extra: dict[str, Any], s: np.ndarray | None, reduction: str,
                     clip: tuple[float, float] = (-math.inf, math.inf)) -> np.ndarray:
    h = np.clip(position_hessian(loss, x, t, params, extra), *clip)
    w = np.ones(x.shape[:-1] if loss == "softmax_focal" else x.shape) if s is None else s
    scale = 1.0 / w.sum() if reduction == "mean" else 1.0
    return scale * (w[..., None] if loss == "softmax_focal" else w) * h


# --- the checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_exact_hessian_matches_reference(loss, params, reduction, dtype):
    x, t, extra = make_inputs(loss, seed=1)
    s = sample_weight(loss, x, seed=1)
    cast = {k: v.astype(dtype) for k, v in extra.items()}
    r = compute(loss, x.astype(dtype), t.astype(dtype), reduction=reduction, sample_weight=s,
                hessian="exact", **cast, **params)
    plain = compute(loss, x.astype(dtype), t.astype(dtype), reduction=reduction,
                    sample_weight=s, gradient=True, **cast, **params)
    np.testing.assert_array_equal(r.gradient, plain.gradient)  # same gradient, bit for bit
    assert r.hessian is not None and r.hessian.dtype == dtype
    xd, td = x.astype(dtype).astype(np.float64), t.astype(dtype).astype(np.float64)
    ed = {k: v.astype(np.float64) for k, v in cast.items()}
    want = expected_hessian(loss, xd, td, params, ed, s, reduction)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(r.hessian, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_hessian_is_the_derivative_of_the_gradient(loss, params):
    x, t, extra = make_inputs(loss, seed=2)
    s = sample_weight(loss, x, seed=2)
    kw = {"reduction": "mean", "sample_weight": s, **extra, **params}
    hess = compute(loss, x, t, hessian="exact", **kw).hessian
    fd = np.empty_like(x)
    for i in range(x.size):
        h = 1e-6 * max(1.0, abs(float(x.flat[i])))
        up, down = x.copy(), x.copy()
        up.flat[i] += h
        down.flat[i] -= h
        fd.flat[i] = (compute(loss, up, t, gradient=True, **kw).gradient.flat[i]
                      - compute(loss, down, t, gradient=True, **kw).gradient.flat[i]) / (2 * h)
    np.testing.assert_allclose(hess, fd, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(fd).max()))


def _torch_sigmoid_focal(z, y, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss, written out (reduction sum)."""
    p = torch.sigmoid(z)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.sum()


def _torch_softmax_focal(z, q, alpha, gamma):
    p = torch.softmax(z, dim=-1)
    return (-alpha * q * (1 - p) ** gamma * torch.log_softmax(z, dim=-1)).sum()


@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_hessian_matches_pytorch_double_backward(loss, params):
    x, t, extra = make_inputs(loss, seed=3)
    ours = compute(loss, x, t, reduction="sum", hessian="exact", **extra, **params).hessian
    tt = torch.tensor(t, dtype=torch.float64)
    if loss == "sigmoid_focal":
        def f(z):
            return _torch_sigmoid_focal(z, tt, params["alpha"], params["gamma"])
    elif loss == "softmax_focal":
        def f(z):
            return _torch_softmax_focal(z, tt, params["alpha"], params["gamma"])
    else:
        nll = torch.nn.GaussianNLLLoss(full=params.get("full", False), reduction="sum")
        var = torch.tensor(extra["variance"], dtype=torch.float64)

        def f(z):
            return nll(z, tt, var)
    full = torch.autograd.functional.hessian(f, torch.tensor(x, dtype=torch.float64))
    theirs = full.reshape(x.size, x.size).diagonal().reshape(x.shape).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12 * np.abs(theirs).max())


@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_clipped_and_constant_modes(loss, params):
    x, t, extra = make_inputs(loss, seed=4)
    s = sample_weight(loss, x, seed=4)
    clipped = compute(loss, x, t, reduction="mean", sample_weight=s, hessian="clipped",
                      hessian_floor=0.05, **extra, **params)
    want = expected_hessian(loss, x, t, params, extra, s, "mean", clip=(0.05, math.inf))
    np.testing.assert_allclose(clipped.hessian, want, rtol=1e-12)
    assert clipped.hessian.min() > 0
    constant = compute(loss, x, t, reduction="sum", sample_weight=s, hessian="constant",
                       hessian_constant=3.0, **extra, **params)
    want = expected_hessian(loss, x, t, params, extra, s, "sum", clip=(3.0, 3.0))
    np.testing.assert_allclose(constant.hessian, want, rtol=1e-15)


def test_focal_losses_are_not_convex():
    """The exact focal Hessian is negative somewhere (the reference agrees); clipped floors it."""
    x = np.array([-3.0, -1.0, 1.0, 3.0])
    y = np.ones(4)
    exact = compute("sigmoid_focal", x, y, reduction="sum", hessian="exact", alpha=-1.0,
                    gamma=2.0).hessian
    np.testing.assert_allclose(exact, sigmoid_focal_second(x, y, -1.0, 2.0), rtol=1e-12)
    assert exact.min() < 0
    clipped = compute("sigmoid_focal", x, y, reduction="sum", hessian="clipped", alpha=-1.0,
                      gamma=2.0).hessian
    np.testing.assert_array_equal(clipped, np.maximum(exact, 1e-16))
    z = np.array([[-2.0, 2.5, 0.0, 1.0]])
    q = np.eye(C)[[0]]
    rows = compute("softmax_focal", z, q, reduction="sum", hessian="exact", alpha=1.0,
                   gamma=4.0).hessian
    np.testing.assert_allclose(rows, softmax_focal_second(z, q, 1.0, 4.0), rtol=1e-12)
    assert rows.min() < 0


def test_gamma_zero_is_the_weighted_cross_entropy_hessian():
    x, y, _ = make_inputs("sigmoid_focal", seed=5)
    focal = compute("sigmoid_focal", x, y, reduction="sum", hessian="exact", alpha=0.25,
                    gamma=0.0).hessian
    bce = compute("binary_cross_entropy", x, y, reduction="sum", hessian="exact",
                  from_logits=True).hessian
    np.testing.assert_allclose(focal, (0.25 * y + 0.75 * (1 - y)) * bce, rtol=1e-14)
    z, q, _ = make_inputs("softmax_focal", seed=5)
    focal = compute("softmax_focal", z, q, reduction="sum", hessian="exact", alpha=0.5,
                    gamma=0.0).hessian
    cce = compute("categorical_cross_entropy", z, q, reduction="sum", hessian="exact",
                  from_logits=True).hessian
    np.testing.assert_allclose(focal, 0.5 * cce, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 1.5])
def test_saturated_logits_take_the_limit(gamma):
    """0 < gamma < 2: (1 - p_t)^(gamma - 2) alone would blow up as p_t -> 1, the whole
    second derivative goes to 0 (like (1 - p_t)^(gamma + 1)); where p_t rounds to 1 it is 0."""
    x = np.array([20.0, 40.0, 800.0, -800.0, -40.0])
    y = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    h = compute("sigmoid_focal", x, y, reduction="sum", hessian="exact", alpha=-1.0,
                gamma=gamma).hessian
    assert np.all(np.isfinite(h))
    np.testing.assert_allclose(h[:1], sigmoid_focal_second(x[:1], y[:1], -1.0, gamma),
                               rtol=1e-9)
    assert abs(h[1]) < 1e-15 and h[2] == 0.0 and h[3] == 0.0 and abs(h[4]) < 1e-15
    z = np.array([[30.0, 0.0, -1.0, 1.0], [800.0, 0.0, 0.0, 0.0], [12.0, 0.0, -1.0, 1.0]])
    q = np.eye(C)[[0, 0, 1]]
    rows = compute("softmax_focal", z, q, reduction="sum", hessian="exact", alpha=1.0,
                   gamma=gamma).hessian
    assert np.all(np.isfinite(rows))
    np.testing.assert_array_equal(rows[1], np.zeros(C))
    np.testing.assert_allclose(rows[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(rows[2], softmax_focal_second(z[2:], q[2:], 1.0, gamma)[0],
                               rtol=1e-8, atol=1e-15)


def test_gaussian_hessian_follows_the_variance_shapes():
    x, y, extra = make_inputs("gaussian_nll", seed=6)
    shared = extra["variance"][:, :1]
    r = compute("gaussian_nll", x, y, variance=shared, reduction="sum", hessian="exact")
    want = np.broadcast_to(1.0 / np.maximum(shared, GAUSSIAN_EPS), x.shape)
    np.testing.assert_allclose(r.hessian, want, rtol=1e-15)


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize(("loss", "params"), [CASES[0], CASES[4], CASES[7]],
                         ids=["sigmoid_focal", "softmax_focal", "gaussian_nll"])
def test_client_hessian_equals_the_engine(client: LossClient, loss, params):
    x, t, extra = make_inputs(loss, seed=7)
    s = sample_weight(loss, x, seed=7)
    args = (x.astype(np.float32), t.astype(np.float32))
    cast = {k: v.astype(np.float32) for k, v in extra.items()}
    for mode, more in (("exact", {}), ("clipped", {"hessian_floor": 0.01}),
                       ("constant", {"hessian_constant": 0.5})):
        got = client.compute_gradient(loss, *args, sample_weight=s, reduction="sum",
                                      hessian=mode, **more, **cast, **params)
        want = compute(loss, *args, sample_weight=s, reduction="sum", hessian=mode, **more,
                       **cast, **params)
        assert got.hessian is not None and got.hessian.dtype == np.float32
        np.testing.assert_array_equal(got.hessian, want.hessian)
        np.testing.assert_array_equal(got.gradient, want.gradient)
    infos = {info.name: info for info in client.list_losses()}
    assert infos[loss].hessian_modes == ("exact", "clipped", "constant")
