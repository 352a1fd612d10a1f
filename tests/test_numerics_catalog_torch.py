"""The extended catalog against PyTorch (CPU): values and autograd gradients.

PyTorch's own losses where it has them (SmoothL1Loss, PoissonNLLLoss, GaussianNLLLoss,
NLLLoss); elsewhere the defining library's formula written in torch operations (Keras,
torchvision, scikit-learn, optax; the reference section is named at each), so that
autograd gives an independent gradient. Comparison as in ``test_numerics_torch.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossgrad import compute
from test_numerics_torch import (
    DTYPES,
    REDUCTIONS,
    TIGHT,
    _assert_close,
    _class_weight,
    _one_torch_thread,  # noqa: F401 - autouse fixture
    _rng,
    _sparse_targets,
    _torch_ce,
    check,
)

KERAS_EPSILON = 1e-7


def reduced(per_position, reduction: str):
    """A loss fn applying ``reduction`` (unweighted) to a per-position torch formula."""

    def fn(*tensors):
        value = per_position(*tensors)
        return {"none": value, "sum": value.sum(), "mean": value.mean()}[reduction]

    return fn


def _values(rng, shape, dtype, low=0.1):
    x = rng.normal(0.0, 2.0, size=shape)
    r = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(low, 3.0, size=shape)
    return x.astype(dtype), (x - r).astype(dtype)


# ---------------------------------------------------------------- PyTorch's own losses

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", (1.0, 0.5, 0.0))
def test_smooth_l1_loss(beta, reduction, dtype):
    rng = _rng("SmoothL1", beta)
    x, y = _values(rng, (4, 2, 3), dtype)
    y = np.where(np.abs(np.abs(x - y) - beta) < 0.05, y - 0.1, y).astype(dtype)  # off the kink
    r = compute("smooth_l1", x, y, reduction=reduction, beta=beta)
    check(r, reduction, torch.nn.SmoothL1Loss(reduction=reduction, beta=beta), x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("log_input", "full"), ((True, False), (True, True), (False, False),
                                                 (False, True)))
def test_poisson_nll_loss(log_input, full, reduction, dtype):
    rng = _rng("PoissonNLL", log_input, full)
    x = rng.normal(0.0, 1.0, size=(5, 4)) if log_input else rng.uniform(0.1, 4.0, size=(5, 4))
    y = rng.poisson(2.0, size=(5, 4)).astype(np.float64)
    y[0, :2] = (0.0, 9.0)
    r = compute("poisson_nll", x.astype(dtype), y.astype(dtype), reduction=reduction,
                log_input=log_input, full=full)
    fn = torch.nn.PoissonNLLLoss(log_input=log_input, full=full, reduction=reduction)
    check(r, reduction, fn, x.astype(dtype), y.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variance_shape", ((4, 3), (4, 1), (4,)), ids=("same", "last1",
                                                                        "shared"))
@pytest.mark.parametrize("full", (False, True))
def test_gaussian_nll_loss(full, variance_shape, reduction, dtype):
    rng = _rng("GaussianNLL", full, variance_shape)
    x, y = _values(rng, (4, 3), dtype)
    var = rng.uniform(0.2, 2.0, size=variance_shape).astype(dtype)
    var.flat[0] = 1e-7  # below the 1e-6 clamp
    r = compute("gaussian_nll", x, y, variance=var, reduction=reduction, full=full)
    fn = torch.nn.GaussianNLLLoss(full=full, reduction=reduction)
    check(r, reduction, fn, x, y, var)
    # The variance's gradient: PyTorch clamps without autograd, as lossgrad documents.
    vt = torch.from_numpy(var.astype(np.float64)).requires_grad_(True)
    fn(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y.astype(np.float64)),
       vt).sum().backward()
    rtol = TIGHT[np.dtype(dtype)][1]
    _assert_close(r.variance_gradient, vt.grad.numpy(), rtol, rtol * 1e-1)


NLL_VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"class_weight": [0.5, 1.0, 2.0, 1.5]}, id="weight"),
    pytest.param({"ignore_index": 2}, id="ignore2"),
    pytest.param({"class_weight": [0.5, 1.0, 2.0, 1.5], "ignore_index": -100}, id="both"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((7, 4), (2, 3, 4)), ids=("7x4", "2x3x4"))
@pytest.mark.parametrize("params", NLL_VARIANTS)
def test_nll_loss(params, shape, reduction, dtype):
    rng = _rng("NLLLoss", shape, sorted(params))
    lp = torch.log_softmax(torch.from_numpy(rng.normal(0.0, 2.0, size=shape)), -1).numpy()
    lp = lp.astype(dtype)
    y = _sparse_targets(rng, shape[:-1], shape[-1], params)
    r = compute("nll", lp, y, reduction=reduction, **params)
    check(r, reduction, _torch_ce(F.nll_loss, params, reduction), lp, y, _class_weight(params))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_label_smoothing_is_cross_entropy_of_log_softmax(reduction, dtype):
    # PyTorch's two-term smoothing (LossNLL.cpp, section 4.5) applied to log-probabilities:
    # (1 - eps) NLLLoss + (eps / C) sum_c w_c (-lp_c), both divided by sum w_y for mean.
    rng = _rng("NLL-smoothing")
    lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(6, 4))), -1).numpy().astype(dtype)
    y = _sparse_targets(rng, (6,), 4, {"ignore_index": 3})
    cw = np.array([0.5, 1.0, 2.0, 1.5])
    eps = 0.2
    r = compute("nll", lp, y, reduction=reduction, label_smoothing=eps, class_weight=cw,
                ignore_index=3)

    def fn(xt, yt, wt):
        keep = (yt != 3).to(xt.dtype)
        safe = torch.where(yt == 3, torch.zeros_like(yt), yt)
        first = F.nll_loss(xt, safe, weight=wt, reduction="none") * keep
        second = -(xt * wt).sum(-1) * keep
        per_row = (1 - eps) * first + eps / 4 * second
        if reduction == "none":
            return per_row
        total = per_row.sum()
        return total if reduction == "sum" else total / (wt[safe] * keep).sum()

    check(r, reduction, fn, lp, y, cw)


# ---------------------------------------------------------------- other libraries' formulas

def _log_cosh(x, y):  # Keras LogCosh: r + softplus(-2r) - log 2 (section 2.6)
    r = x - y
    return r + F.softplus(-2.0 * r) - math.log(2.0)


def _pinball(tau):  # scikit-learn mean_pinball_loss (section 2.7)
    def fn(x, y):
        d = y - x
        return tau * torch.clamp(d, min=0) + (1 - tau) * torch.clamp(-d, min=0)
    return fn


def _mape(x, y):  # Keras MeanAbsolutePercentageError (section 2.8)
    return 100.0 * torch.abs((y - x) / torch.clamp(torch.abs(y), min=KERAS_EPSILON))


def _msle(x, y):  # Keras MeanSquaredLogarithmicError (section 2.9)
    a = torch.log(torch.clamp(x, min=KERAS_EPSILON) + 1.0)
    b = torch.log(torch.clamp(y, min=KERAS_EPSILON) + 1.0)
    return (a - b) ** 2


def _tweedie(p):  # scikit-learn mean_tweedie_deviance, 1 < p < 2 (section 2.12)
    def fn(mu, y):
        return 2 * (torch.clamp(y, min=0) ** (2 - p) / ((1 - p) * (2 - p))
                    - y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p))
    return fn


def _sigmoid_focal(alpha, gamma):  # torchvision ops.sigmoid_focal_loss (section 4.8)
    def fn(x, y):
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
        return loss
    return fn


ELEMENTWISE_FORMULAS = [
    pytest.param("log_cosh", {}, _log_cosh, "values", id="log_cosh"),
    pytest.param("quantile", {"quantile": 0.8}, _pinball(0.8), "values", id="quantile"),
    pytest.param("mape", {}, _mape, "values", id="mape"),
    pytest.param("msle", {}, _msle, "positive", id="msle"),
    pytest.param("tweedie", {"power": 1.3}, _tweedie(1.3), "positive", id="tweedie"),
    pytest.param("sigmoid_focal", {}, _sigmoid_focal(0.25, 2.0), "logits", id="focal"),
    pytest.param("sigmoid_focal", {"alpha": -1.0, "gamma": 1.5}, _sigmoid_focal(-1.0, 1.5),
                 "logits", id="focal-no-alpha"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "params", "formula", "inputs"), ELEMENTWISE_FORMULAS)
def test_elementwise_formulas(loss, params, formula, inputs, reduction, dtype):
    rng = _rng("formula", loss, sorted(params))
    shape = (5, 4)
    if inputs == "values":
        x, y = _values(rng, shape, dtype)
    elif inputs == "positive":
        x = rng.uniform(0.1, 4.0, size=shape).astype(dtype)
        y = rng.uniform(0.0, 4.0, size=shape).astype(dtype)
    else:
        x = rng.normal(0.0, 3.0, size=shape).astype(dtype)
        y = np.where(rng.random(shape) < 0.5, rng.integers(0, 2, shape), rng.random(shape))
        y = y.astype(dtype)
    r = compute(loss, x, y, reduction=reduction, **params)
    check(r, reduction, reduced(formula, reduction), x, y)


def _softmax_focal(alpha, gamma):  # Keras CategoricalFocalCrossentropy, logits (4.8)
    def fn(x, q):
        logp = torch.log_softmax(x, -1)
        return (alpha * (1 - logp.exp()) ** gamma * -q * logp).sum(-1)
    return fn


def _categorical_hinge(x, y):  # Keras CategoricalHinge (section 3.3)
    pos = (y * x).sum(-1)
    neg = ((1 - y) * x).amax(-1)
    return torch.clamp(neg - pos + 1, min=0)


def _cosine(x, y):  # Keras CosineSimilarity: x / max(||x||, 1e-7) (section 3.7)
    nx = torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=KERAS_EPSILON)
    ny = torch.clamp(torch.linalg.vector_norm(y, dim=-1, keepdim=True), min=KERAS_EPSILON)
    return -((x / nx) * (y / ny)).sum(-1)


def _crammer_singer(x, y):  # optax multiclass_hinge_loss (section 3.3)
    one_hot = F.one_hot(y, x.shape[-1]).to(x.dtype)
    return (x + 1 - one_hot).amax(-1) - (x * one_hot).sum(-1)


ROW_FORMULAS = [
    pytest.param("softmax_focal", {}, _softmax_focal(0.25, 2.0), "soft", id="softmax_focal"),
    pytest.param("softmax_focal", {"alpha": 1.0, "gamma": 0.5}, _softmax_focal(1.0, 0.5),
                 "soft", id="softmax_focal-gamma0.5"),
    pytest.param("categorical_hinge", {}, _categorical_hinge, "one_hot", id="categorical_hinge"),
    pytest.param("cosine_similarity", {}, _cosine, "vectors", id="cosine_similarity"),
    pytest.param("multiclass_hinge", {}, _crammer_singer, "indices", id="multiclass_hinge"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "params", "formula", "targets"), ROW_FORMULAS)
def test_row_formulas(loss, params, formula, targets, reduction, dtype):
    rng = _rng("rows", loss, sorted(params))
    shape = (2, 3, 5)
    x = rng.normal(0.0, 1.5, size=shape).astype(dtype)
    if targets == "soft":
        y = rng.random(shape) ** 2
        y = (y / y.sum(-1, keepdims=True)).astype(dtype)
    elif targets == "one_hot":
        y = np.eye(5, dtype=dtype)[rng.integers(0, 5, size=shape[:-1])]
    elif targets == "vectors":
        y = rng.normal(size=shape).astype(dtype)
    else:
        y = rng.integers(0, 5, size=shape[:-1])
    r = compute(loss, x, y, reduction=reduction, **params)
    check(r, reduction, reduced(formula, reduction), x, y)


# ---------------------------------------------------------------- Hessians by double backward

HESSIAN_FORMULAS = [
    pytest.param("smooth_l1", {"beta": 0.5},
                 lambda x, y: F.smooth_l1_loss(x, y, beta=0.5, reduction="none"), "values",
                 id="smooth_l1"),
    pytest.param("log_cosh", {}, _log_cosh, "values", id="log_cosh"),
    pytest.param("msle", {}, _msle, "positive", id="msle"),
    pytest.param("tweedie", {"power": 1.3}, _tweedie(1.3), "positive", id="tweedie"),
    pytest.param("poisson_nll", {}, lambda x, y: F.poisson_nll_loss(x, y, reduction="none"),
                 "log_rates", id="poisson_nll-log"),
    pytest.param("poisson_nll", {"log_input": False},
                 lambda x, y: F.poisson_nll_loss(x, y, log_input=False, reduction="none"),
                 "positive", id="poisson_nll-rate"),
    pytest.param("cosine_similarity", {}, _cosine, "values", id="cosine_similarity"),
]


@pytest.mark.parametrize(("loss", "params", "formula", "inputs"), HESSIAN_FORMULAS)
def test_hessian_matches_pytorch_double_backward(loss, params, formula, inputs):
    rng = _rng("hessian", loss, sorted(params))
    shape = (3, 4)
    if inputs == "values":
        x, y = _values(rng, shape, np.float64)
    elif inputs == "positive":
        x, y = rng.uniform(0.2, 4.0, size=shape), rng.poisson(2.0, size=shape).astype(float)
    else:
        x, y = rng.normal(size=shape), rng.poisson(2.0, size=shape).astype(float)
    r = compute(loss, x, y, reduction="sum", hessian="exact", **params)
    yt = torch.from_numpy(y)
    full = torch.autograd.functional.hessian(lambda xt: formula(xt, yt).sum(),
                                             torch.from_numpy(x))
    want = full.reshape(x.size, x.size).diagonal().reshape(shape).numpy()
    _assert_close(r.hessian, want, 1e-10, 1e-12)
