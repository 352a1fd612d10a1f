"""Diagonal Hessians (ComputeGradient ``hessian``) against independent references.

Each exact Hessian is checked three ways: against float64 NumPy formulas written here from
the loss reference (``losses-reference.md`` sections 2-4, and the conventions' clamps),
against central finite differences of the engine's own gradient, and against PyTorch's
double backward (``torch.autograd.functional.hessian``) where PyTorch has the loss. The
clipped and constant modes are checked against the same formulas, the errors by field and
reason, and the whole path end to end through the real client and server.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lossgrad import compute
from lossgrad.errors import InvalidArgumentError
from lossgrad.kernels import second_order
from lossgrad.kernels._numerics import PARALLEL_MIN
from lossgrad_client import AsyncLossClient, LossClient
from lossgrad_client import InvalidArgumentError as ClientInvalidArgument
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

C = 4  # classes
CLASS_WEIGHT = [0.5, 2.0, 1.0, 1.5]
LOG_FLOOR = -100.0

CASES: list[tuple[str, dict[str, Any]]] = [
    ("mae", {}),
    ("mse", {}),
    ("huber", {"delta": 0.7}),
    ("pseudo_huber", {"delta": 1.5}),
    ("hinge", {}),
    ("squared_hinge", {}),
    ("binary_cross_entropy", {"from_logits": True, "pos_weight": 2.5, "label_smoothing": 0.1}),
    ("binary_cross_entropy", {"pos_weight": 0.5, "label_smoothing": 0.2}),
    ("categorical_cross_entropy", {"from_logits": True, "label_smoothing": 0.1}),
    ("categorical_cross_entropy", {"label_smoothing": 0.1}),
    ("sparse_categorical_cross_entropy",
     {"from_logits": True, "class_weight": CLASS_WEIGHT, "label_smoothing": 0.1,
      "ignore_index": 2}),
    ("sparse_categorical_cross_entropy", {"class_weight": CLASS_WEIGHT, "label_smoothing": 0.05}),
    ("kl_divergence", {}),
    ("kl_divergence", {"log_predictions": True}),
]
IDS = [f"{loss}-{'-'.join(f'{k}' for k in params)}" for loss, params in CASES]
ROWS = ("categorical_cross_entropy", "sparse_categorical_cross_entropy", "kl_divergence")


# --- inputs, away from kinks so that finite differences hold -----------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_inputs(loss: str, params: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if loss in ROWS:
        z = rng.normal(0, 1.5, (7, C))
        probs = _softmax(z)
        if loss == "sparse_categorical_cross_entropy":
            y = rng.integers(0, C, 7)
            y[:2] = (0, 2)  # with ignore_index=2, row 1 is ignored
            return (z if params.get("from_logits") else probs), y
        q = _softmax(rng.normal(0, 1.0, (7, C)))
        if loss == "kl_divergence":
            q[0, 1] = 0.0  # a zero target probability contributes 0
            return (np.log(probs) if params.get("log_predictions") else probs), q
        return (z if params.get("from_logits") else probs), q
    shape = (5, 6)
    if loss in ("hinge", "squared_hinge"):
        y = rng.choice([-1.0, 1.0], shape)
        margin = rng.choice([-1, 1], shape) * rng.uniform(0.1, 1.5, shape)
        return (1.0 - margin) * y, y  # 1 - y x = margin, never 0
    if loss == "binary_cross_entropy":
        t = rng.uniform(0, 1, shape)
        x = rng.normal(0, 2, shape) if params.get("from_logits") else rng.uniform(0.05, 0.95,
                                                                                   shape)
        return x, t
    t = rng.normal(0, 1, shape)
    r = rng.choice([-1, 1], shape) * rng.uniform(0.05, 2.5, shape)
    if loss == "huber":  # keep |r| off delta
        r = np.where(np.abs(np.abs(r) - params["delta"]) < 0.05, r * 0.5, r)
    return t + r, t


def sample_weight(loss: str, x: np.ndarray, seed: int) -> np.ndarray:
    shape = x.shape[:-1] if loss in ROWS else x.shape
    return np.random.default_rng(seed + 100).uniform(0.2, 2.0, shape)


# --- float64 references, from the formulas of the loss reference ---------------------------

def _active(v: np.ndarray) -> np.ndarray:
    """Where log v is above PyTorch's floor (a floored term has derivative 0)."""
    with np.errstate(divide="ignore"):
        return np.log(v) > LOG_FLOOR


def position_hessian(loss: str, x: np.ndarray, t: np.ndarray,
                     params: dict[str, Any]) -> np.ndarray:
    """d^2 l_i / d x^2 per element, unweighted (class weights included), float64."""
    x = np.asarray(x, np.float64)
    eps = params.get("label_smoothing", 0.0)
    if loss == "mae" or loss == "hinge":  # 2.1, 3.1: piecewise linear
        return np.zeros_like(x)
    if loss == "mse":  # 2.2
        return np.full_like(x, 2.0)
    if loss == "huber":  # 2.4, 1.5: the quadratic side at |r| = delta
        return (np.abs(x - t) <= params["delta"]).astype(np.float64)
    if loss == "pseudo_huber":  # 2.5
        return (1.0 + ((x - t) / params["delta"]) ** 2) ** -1.5
    if loss == "squared_hinge":  # 3.2
        return np.where(1.0 - t * x > 0, 2.0, 0.0)
    if loss == "binary_cross_entropy":
        ts = t * (1 - eps) + eps / 2  # Keras smoothing (4.6)
        pw = params.get("pos_weight", 1.0)
        if params.get("from_logits"):  # 4.2
            s = 1.0 / (1.0 + np.exp(-x))
            return (1.0 + (pw - 1.0) * ts) * s * (1.0 - s)
        return (pw * ts / x**2 * _active(x)  # 4.1, each term 0 where its floor is active
                + (1.0 - ts) / (1.0 - x) ** 2 * _active(1.0 - x))
    if loss == "categorical_cross_entropy":
        q = (1 - eps) * np.asarray(t, np.float64) + eps / C  # 4.6
        if params.get("from_logits"):  # 4.4: (sum a) p (1 - p)
            p = _softmax(x)
            return q.sum(axis=-1, keepdims=True) * p * (1 - p)
        return q / x**2 * _active(x)  # 4.3
    if loss == "sparse_categorical_cross_entropy":  # 4.5, two-term smoothing
        w = np.asarray(params.get("class_weight") or [1.0] * C)
        wy = w[t]
        if params.get("from_logits"):
            p = _softmax(x)
            a = (1 - eps) * wy + eps / C * w.sum()
            return a[:, None] * p * (1 - p)
        onehot = np.eye(C)[t]
        a = (1 - eps) * wy[:, None] * onehot + eps / C * w[None, :]
        return a / x**2 * _active(x)
    if loss == "kl_divergence":  # 4.7
        if params.get("log_predictions"):
            return np.zeros_like(x)
        return np.where(t > 0, t / x**2, 0.0) * _active(x)
    raise AssertionError(loss)


def expected_hessian(loss: str, x: np.ndarray, t: np.ndarray, params: dict[str, Any],
                     s: np.ndarray | None, reduction: str,
                     clip: tuple[float, float] = (-math.inf, math.inf)) -> np.ndarray:
    """scale * s_i * clip(h_i): sample weights broadcast over the class axis, 0 on ignored
    rows, scale 1/sum(w) for mean (w_i = s_i times the target's class weight)."""
    h = np.clip(position_hessian(loss, x, t, params), *clip)
    s = np.ones(x.shape[:-1] if loss in ROWS else x.shape) if s is None else np.asarray(s)
    w = s
    if loss == "sparse_categorical_cross_entropy":
        keep = t != params.get("ignore_index", -1)
        s = s * keep
        w = s * np.asarray(params.get("class_weight") or [1.0] * C)[t]
    scale = 1.0 / math.fsum(w.ravel()) if reduction == "mean" else 1.0
    weights = s[..., None] if loss in ROWS else s
    return scale * weights * h


def finite_difference_diagonal(loss: str, x: np.ndarray, grad_of) -> np.ndarray:
    """Central differences of the gradient. Positions are independent, so one column
    (rows) or the whole tensor (elementwise) is stepped at a time."""
    step = 1e-6
    out = np.empty_like(x)
    columns = range(x.shape[-1]) if loss in ROWS else [None]
    for k in columns:
        e = np.zeros_like(x)
        if k is None:
            e[...] = step
        else:
            e[..., k] = step
        diff = (grad_of(x + e) - grad_of(x - e)) / (2 * step)
        if k is None:
            out[...] = diff
        else:
            out[..., k] = diff[..., k]
    return out


# --- the engine against the references -----------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_exact_hessian_matches_reference(loss, params, reduction, dtype):
    x, t = make_inputs(loss, params, seed=1)
    s = sample_weight(loss, x, seed=1)
    x_in = x.astype(dtype)
    t_in = t if t.dtype.kind == "i" else t.astype(dtype)
    r = compute(loss, x_in, t_in, reduction=reduction, sample_weight=s, hessian="exact",
                **params)
    assert r.hessian is not None and r.hessian.dtype == dtype and r.hessian.shape == x.shape
    want = expected_hessian(loss, x_in.astype(np.float64), t_in, params, s, reduction)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(r.hessian, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_gradient_and_loss_are_those_of_the_gradient_path(loss, params):
    """Asking for a Hessian changes neither the loss nor the gradient, bit for bit."""
    x, t = make_inputs(loss, params, seed=2)
    s = sample_weight(loss, x, seed=2)
    for dtype in (np.float64, np.float32):
        x_in = x.astype(dtype)
        t_in = t if t.dtype.kind == "i" else t.astype(dtype)
        for reduction in ("none", "mean"):
            plain = compute(loss, x_in, t_in, reduction=reduction, sample_weight=s, **params)
            with_h = compute(loss, x_in, t_in, reduction=reduction, sample_weight=s,
                             hessian="exact", **params)
            assert plain.hessian is None
            np.testing.assert_array_equal(with_h.gradient, plain.gradient)
            np.testing.assert_array_equal(with_h.loss, plain.loss)


@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_hessian_is_the_derivative_of_the_gradient(loss, params):
    x, t = make_inputs(loss, params, seed=3)
    s = sample_weight(loss, x, seed=3)

    def grad_of(z: np.ndarray) -> np.ndarray:
        return compute(loss, z, t, reduction="mean", sample_weight=s, **params).gradient

    h = compute(loss, x, t, reduction="mean", sample_weight=s, hessian="exact",
                **params).hessian
    fd = finite_difference_diagonal(loss, x, grad_of)
    np.testing.assert_allclose(h, fd, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(fd).max()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_rmse_hessian_is_the_diagonal_of_its_dense_hessian(reduction):
    """rmse is not separable: each element is stepped on its own (reference 2.3)."""
    rng = np.random.default_rng(4)
    x, t, w = rng.normal(size=7), rng.normal(size=7), rng.uniform(0.5, 2, 7)
    r = compute("rmse", x, t, reduction=reduction, sample_weight=w, hessian="exact")
    d = w.sum() if reduction == "mean" else 1.0
    big_r = math.sqrt(np.sum(w * (x - t) ** 2) / d)
    want = w / (d * big_r) - (w * (x - t)) ** 2 / (d**2 * big_r**3)
    np.testing.assert_allclose(r.hessian, want, rtol=1e-12)
    fd = np.empty(7)
    for i in range(7):
        e = np.zeros(7)
        e[i] = 1e-6
        g = [compute("rmse", z, t, reduction=reduction, sample_weight=w).gradient[i]
             for z in (x + e, x - e)]
        fd[i] = (g[0] - g[1]) / 2e-6
    np.testing.assert_allclose(r.hessian, fd, rtol=1e-5)
    zero = compute("rmse", t, t, reduction=reduction, hessian="exact")  # R = 0
    np.testing.assert_array_equal(zero.hessian, np.zeros(7))
    none = compute("rmse", x, t, reduction="none", sample_weight=w, hessian="exact")
    np.testing.assert_array_equal(none.hessian, np.zeros(7))


# --- PyTorch's double backward ---------------------------------------------------------------

def _torch_diagonal(f, x: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64)
    full = torch.autograd.functional.hessian(f, xt)
    return full.reshape(x.size, x.size).diagonal().reshape(x.shape).numpy()


def _t(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


TORCH_CASES = [
    ("mse", {}, lambda t, p: lambda z: F.mse_loss(z, _t(t))),
    ("huber", {"delta": 0.7}, lambda t, p: lambda z: F.huber_loss(z, _t(t), delta=0.7)),
    ("binary_cross_entropy", {"from_logits": True, "pos_weight": 2.5},
     lambda t, p: lambda z: F.binary_cross_entropy_with_logits(
         z, _t(t), pos_weight=torch.tensor(2.5, dtype=torch.float64))),
    ("binary_cross_entropy", {}, lambda t, p: lambda z: F.binary_cross_entropy(z, _t(t))),
    ("categorical_cross_entropy", {"from_logits": True, "label_smoothing": 0.1},
     lambda t, p: lambda z: F.cross_entropy(z, _t(t), label_smoothing=0.1)),
    ("sparse_categorical_cross_entropy",
     {"from_logits": True, "class_weight": CLASS_WEIGHT, "label_smoothing": 0.1,
      "ignore_index": 2},
     lambda t, p: lambda z: F.cross_entropy(
         z, torch.as_tensor(t), weight=_t(CLASS_WEIGHT), ignore_index=2, label_smoothing=0.1)),
    ("sparse_categorical_cross_entropy", {},
     lambda t, p: lambda z: F.nll_loss(torch.log(z), torch.as_tensor(t))),
    ("kl_divergence", {}, lambda t, p: lambda z: F.kl_div(torch.log(z), _t(t),
                                                          reduction="batchmean")),
]


@pytest.mark.parametrize(("loss", "params", "torch_loss"), TORCH_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_hessian_matches_pytorch_double_backward(loss, params, torch_loss):
    x, t = make_inputs(loss, params, seed=5)
    ours = compute(loss, x, t, hessian="exact", **params).hessian  # unweighted mean
    theirs = _torch_diagonal(torch_loss(t, params), x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)


# --- clipped and constant --------------------------------------------------------------------

@pytest.mark.parametrize(("loss", "params"), CASES, ids=IDS)
def test_clipped_and_constant_modes(loss, params):
    x, t = make_inputs(loss, params, seed=6)
    s = sample_weight(loss, x, seed=6)
    floor = 0.05
    clipped = compute(loss, x, t, reduction="mean", sample_weight=s, hessian="clipped",
                      hessian_floor=floor, **params)
    want = expected_hessian(loss, x, t, params, s, "mean", clip=(floor, math.inf))
    np.testing.assert_allclose(clipped.hessian, want, rtol=1e-12, atol=1e-300)
    constant = compute(loss, x, t, reduction="sum", sample_weight=s, hessian="constant",
                       hessian_constant=3.0, **params)
    want = expected_hessian(loss, x, t, params, s, "sum", clip=(3.0, 3.0))
    np.testing.assert_allclose(constant.hessian, want, rtol=1e-15)
    default = compute(loss, x, t, reduction="sum", hessian="constant", **params)
    np.testing.assert_array_equal(default.hessian,
                                  expected_hessian(loss, x, t, params, None, "sum", (1, 1)))


def test_default_floor_matches_xgboost_logistic():
    """binary:logistic floors p (1 - p) at 1e-16 (reference 1.7): with sum, that is the
    clipped Hessian with the default floor, float64 and float32."""
    x = np.array([-50.0, -40.0, -3.0, 0.0, 2.0, 38.0, 60.0])
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    for dtype in (np.float64, np.float32):
        r = compute("binary_cross_entropy", x.astype(dtype), y.astype(dtype), from_logits=True,
                    reduction="sum", hessian="clipped")
        p = 1.0 / (1.0 + np.exp(-x))
        np.testing.assert_allclose(r.hessian, np.maximum(p * (1 - p), 1e-16), rtol=2e-6)
        np.testing.assert_allclose(r.gradient, p - y, rtol=2e-6, atol=1e-7)
        assert r.hessian.min() > 0


def test_saturated_probabilities_stay_finite():
    """Probabilities at the floor and float32 subnormals: finite, 0 where the floor is on."""
    p = np.array([1e-50, 1e-40, 0.5, 1.0])
    y = np.array([1.0, 0.0, 0.5, 1.0])
    r = compute("binary_cross_entropy", p, y, reduction="sum", hessian="exact")
    np.testing.assert_allclose(r.hessian, [0.0, 1.0, 4.0, 1.0], rtol=1e-12)
    r32 = compute("binary_cross_entropy", np.array([1e-40, 0.5], np.float32),
                  np.array([1.0, 1.0], np.float32), reduction="sum", hessian="exact")
    assert r32.hessian[0] == np.finfo(np.float32).max and np.isfinite(r32.hessian).all()


def test_serial_and_parallel_give_the_same_bits():
    rng = np.random.default_rng(8)
    n = PARALLEL_MIN + 123
    x, t = rng.normal(size=n), rng.uniform(size=n)
    outs = []
    for parallel in (False, True):
        grad, hess = np.empty(n), np.empty(n)
        total = second_order.elementwise(x, t, np.empty(0), np.empty(0), grad, hess, 1.0 / n,
                                         7, 1.0, 0.0, np.array([1e-16, np.inf]), True,
                                         parallel)
        outs.append((total, grad, hess))
    assert outs[0][0] == outs[1][0]
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(outs[0][2], outs[1][2])
    p = 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(outs[0][2], p * (1 - p) / n, rtol=1e-12)


def test_rows_serial_and_parallel_give_the_same_bits():
    """Row kernels past PARALLEL_MIN elements: the same bits on one thread or several,
    and the gradient of the gradient-only path."""
    rng = np.random.default_rng(12)
    rows = PARALLEL_MIN // C + 77
    x = rng.normal(size=(rows, C)).astype(np.float32)
    q = _softmax(rng.normal(size=(rows, C))).astype(np.float32)
    y = rng.integers(0, C, rows)
    bounds, empty = np.array([0.01, np.inf]), np.empty(0)
    dense, sparse = [], []
    for parallel in (False, True):
        grad, hess = np.empty_like(x), np.empty_like(x)
        total = second_order.dense_rows(x, q, empty, np.empty(0, np.float32), grad, hess,
                                        1.0, 0, 0.1, bounds, True, parallel)  # CCE_LOGITS
        dense.append((total, grad, hess))
        grad, hess = np.empty_like(x), np.empty_like(x)
        total = second_order.sparse_rows(x, y, empty, np.asarray(CLASS_WEIGHT), np.empty(
            0, np.float32), grad, hess, 1.0, 2, 0.1, 0, bounds, True, parallel)  # logits
        sparse.append((total, grad, hess))
    for serial, threaded in (dense, sparse):
        assert serial[0] == threaded[0]
        np.testing.assert_array_equal(serial[1], threaded[1])
        np.testing.assert_array_equal(serial[2], threaded[2])
    params = {"from_logits": True, "class_weight": CLASS_WEIGHT, "label_smoothing": 0.1,
              "ignore_index": 2}
    plain = compute("sparse_categorical_cross_entropy", x, y, **params)
    with_h = compute("sparse_categorical_cross_entropy", x, y, hessian="clipped", **params)
    np.testing.assert_array_equal(with_h.gradient, plain.gradient)
    assert with_h.loss == plain.loss


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field", "reason"), [
    ({"hessian": "newton"}, "hessian", "UNKNOWN_HESSIAN_MODE"),
    ({"hessian": "clipped", "loss": "rmse"}, "hessian", "HESSIAN_NOT_SUPPORTED"),
    ({"hessian": "constant", "loss": "rmse"}, "hessian", "HESSIAN_NOT_SUPPORTED"),
    ({"hessian": "exact", "hessian_floor": 0.1}, "hessian_floor", "UNKNOWN_PARAMETER"),
    ({"hessian_floor": 0.1}, "hessian_floor", "UNKNOWN_PARAMETER"),
    ({"hessian": "clipped", "hessian_constant": 2.0}, "hessian_constant", "UNKNOWN_PARAMETER"),
    ({"hessian": "clipped", "hessian_floor": -1e-3}, "hessian_floor", "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "clipped", "hessian_floor": math.nan}, "hessian_floor",
     "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "clipped", "hessian_floor": "a"}, "hessian_floor", "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "constant", "hessian_constant": 0.0}, "hessian_constant",
     "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "constant", "hessian_constant": math.inf}, "hessian_constant",
     "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "exact", "gradient": False}, "hessian", "INVALID_ARGUMENT"),
])
def test_bad_hessian_requests_name_the_field(kwargs, field, reason):
    kwargs = dict(kwargs)
    loss = kwargs.pop("loss", "mse")
    with pytest.raises(InvalidArgumentError) as info:
        compute(loss, [1.0, 2.0], [0.0, 1.0], **kwargs)
    assert (info.value.field, info.value.reason) == (field, reason)


def test_clipped_floor_zero_is_allowed():
    r = compute("hinge", [0.5, 3.0], [1.0, 1.0], hessian="clipped", hessian_floor=0.0)
    np.testing.assert_array_equal(r.hessian, [0.0, 0.0])


# --- end to end through the real client and server ---------------------------------------------

pytest_e2e = pytest.mark.e2e


@pytest_e2e
@pytest.mark.parametrize(("loss", "params"), [CASES[6], CASES[10], CASES[2]],
                         ids=["bce_logits", "sparse_logits", "huber"])
def test_client_hessian_equals_the_engine(client: LossClient, loss, params):
    x, t = make_inputs(loss, params, seed=9)
    s = sample_weight(loss, x, seed=9)
    for mode, extra in (("exact", {}), ("clipped", {"hessian_floor": 0.01}),
                        ("constant", {"hessian_constant": 0.5})):
        got = client.compute_gradient(loss, x.astype(np.float32), t if t.dtype.kind == "i"
                                      else t.astype(np.float32), sample_weight=s,
                                      reduction="sum", hessian=mode, **extra, **params)
        want = compute(loss, x.astype(np.float32), t if t.dtype.kind == "i"
                       else t.astype(np.float32), sample_weight=s, reduction="sum",
                       hessian=mode, **extra, **params)
        assert got.hessian is not None and got.hessian.dtype == np.float32
        np.testing.assert_array_equal(got.hessian, want.hessian)
        np.testing.assert_array_equal(got.gradient, want.gradient)
    plain = client.compute_gradient(loss, x, t, **params)
    assert plain.hessian is None


@pytest_e2e
def test_async_client_hessian(server_address: str, client: LossClient):
    x, y = make_inputs("sparse_categorical_cross_entropy", {"from_logits": True}, seed=10)

    async def call() -> Any:
        async with AsyncLossClient(server_address, timeout=60) as aclient:
            return await aclient.compute_gradient(
                "sparse_categorical_cross_entropy", x, y, from_logits=True,
                reduction="sum", hessian="clipped")

    got = asyncio.run(call())
    want = client.compute_gradient("sparse_categorical_cross_entropy", x, y, from_logits=True,
                                   reduction="sum", hessian="clipped")
    np.testing.assert_array_equal(got.hessian, want.hessian)
    p = _softmax(x)
    np.testing.assert_allclose(got.hessian, p * (1 - p), rtol=1e-12)


@pytest_e2e
@pytest.mark.parametrize(("kwargs", "field", "reason"), [
    ({"loss": "rmse", "hessian": "clipped"}, "hessian", "HESSIAN_NOT_SUPPORTED"),
    ({"hessian": "constant", "hessian_constant": -1.0}, "hessian_constant",
     "PARAMETER_OUT_OF_RANGE"),
    ({"hessian": "exact", "hessian_floor": 1.0}, "hessian_floor", "UNKNOWN_PARAMETER"),
])
def test_server_rejects_bad_hessian_requests(client: LossClient, kwargs, field, reason):
    kwargs = dict(kwargs)
    loss = kwargs.pop("loss", "mse")
    with pytest.raises(ClientInvalidArgument) as info:
        client.compute_gradient(loss, [1.0, 2.0], [0.0, 0.0], **kwargs)
    assert (info.value.code, info.value.field, info.value.reason) == \
        (grpc.StatusCode.INVALID_ARGUMENT, field, reason)
    ok = client.compute_gradient("mse", [1.0], [0.0], hessian="exact")  # still serving
    np.testing.assert_array_equal(ok.hessian, [2.0])


@pytest_e2e
def test_client_refuses_an_unknown_mode_before_sending(client: LossClient):
    with pytest.raises(ClientInvalidArgument) as info:
        client.compute_gradient("mse", [1.0], [0.0], hessian="newton")
    assert (info.value.field, info.value.reason) == ("hessian", "UNKNOWN_HESSIAN_MODE")
    with pytest.raises(ClientInvalidArgument) as info:
        client.compute_gradient("mse", [1.0], [0.0], hessian="clipped", hessian_floor="x")
    assert info.value.field == "hessian_floor"


@pytest_e2e
def test_unknown_mode_value_from_a_raw_stub(stub):
    def tensor(values: list[float]) -> pb.Tensor:
        return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[len(values)],
                         data=np.asarray(values, np.float64).tobytes())

    request = pb.ComputeGradientRequest(loss="mse", predictions=tensor([1.0]),
                                        targets=tensor([0.0]), hessian=17)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeGradient(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hessian" in info.value.details()
    request.hessian = pb.HESSIAN_MODE_EXACT
    reply = stub.ComputeGradient(request, timeout=60)
    assert np.frombuffer(reply.hessian.data, np.float64).tolist() == [2.0]


@pytest_e2e
def test_catalog_lists_hessian_modes(client: LossClient, stub):
    infos = {info.name: info for info in client.list_losses()}
    assert infos["mse"].hessian_modes == ("exact", "clipped", "constant")
    assert infos["rmse"].hessian_modes == ("exact",)
    assert all(info.hessian for info in infos.values())
    features = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60).features
    assert features.hessian


def test_half_precision_hessian_is_narrowed_once():
    """float16 predictions: computed in float32 like the gradient, returned as float16."""
    x, t = make_inputs("binary_cross_entropy", {"from_logits": True}, seed=11)
    r = compute("binary_cross_entropy", x.astype(np.float16), t.astype(np.float16),
                from_logits=True, reduction="sum", hessian="exact")
    assert r.hessian.dtype == np.float16
    want = position_hessian("binary_cross_entropy", x.astype(np.float16),
                            t.astype(np.float16).astype(np.float64), {"from_logits": True})
    np.testing.assert_allclose(r.hessian, want, rtol=2e-3)


@pytest_e2e
def test_a_hessian_call_is_never_streamed(server_address: str):
    with LossClient(server_address, timeout=60, stream_threshold_bytes=1000) as small:
        with pytest.raises(ClientInvalidArgument) as info:
            small.compute_gradient("mse", [1.0], [0.0], hessian="exact", stream=True)
        assert info.value.field == "hessian"
        r = small.compute_gradient("mse", np.ones(3000), np.zeros(3000), hessian="exact",
                                   reduction="sum")  # past the streaming threshold: unary
        assert r.hessian is not None and np.all(r.hessian == 2.0)
