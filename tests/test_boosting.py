"""lossgrad_client.boosting against XGBoost's and LightGBM's built-in objectives, through
the session's real server.

XGBoost has no API that returns its built-in objectives' gradients, so they are read off
one-round trainings on a single row with ``min_child_weight=0`` and ``eta=1``: the tree
is one leaf, whose value is -g / (h + lambda). Two trainings, lambda = 0 and lambda = 1,
give g and h separately (with v0 = -g/h and v1 = -g/(h + 1): g = -v0 v1 / (v0 - v1),
h = -g / v0). A multi-class row grows one such leaf per class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from lossgrad_client import InvalidArgumentError, LossClient
from lossgrad_client.boosting import objective

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

pytestmark = pytest.mark.e2e

K = 3


def xgboost_builtin(params: dict[str, Any], margin: np.ndarray, label: float,
                    weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The built-in objective's weighted (g, h) at one row's ``margin`` (K values for
    multi-class), from the leaves of two one-round trainings."""
    leaves = []
    for lam in (0.0, 1.0):
        data = xgb.DMatrix(np.zeros((1, 1)), np.array([label]), weight=np.array([weight]),
                           base_margin=margin.reshape(1, -1))
        booster = xgb.train({**params, "eta": 1.0, "lambda": lam, "min_child_weight": 0.0,
                             "max_delta_step": 0.0, "nthread": 1}, data, 1)
        leaves.append(booster.predict(data, output_margin=True).astype(np.float64).ravel()
                      - margin)
    v0, v1 = leaves
    g = -v0 * v1 / (v0 - v1)
    return g, -g / v0


BUILTINS = [
    ("reg:squarederror", {}, "mse", {"scale": 0.5}),
    ("reg:pseudohubererror", {"huber_slope": 1.5}, "pseudo_huber", {"delta": 1.5}),
    ("binary:logistic", {}, "binary_cross_entropy", {"from_logits": True}),
    ("multi:softprob", {"num_class": K}, "sparse_categorical_cross_entropy",
     {"from_logits": True, "hessian_scale": 2.0}),
]


@pytest.mark.parametrize(("builtin", "extra", "loss", "kwargs"), BUILTINS,
                         ids=[b[0] for b in BUILTINS])
def test_gradient_and_hessian_equal_xgboost_builtin(client: LossClient, builtin, extra, loss,
                                                    kwargs):
    rng = np.random.default_rng(1)
    n = 12
    multi = builtin.startswith("multi")
    margins = rng.normal(0, 1.5, (n, K) if multi else n)
    if builtin.startswith("reg:"):
        labels = margins + rng.choice([-1, 1], n) * rng.uniform(0.3, 2.0, n)  # g != 0
    elif multi:
        labels = rng.integers(0, K, n).astype(np.float64)
    else:
        labels = rng.integers(0, 2, n).astype(np.float64)
    weights = rng.uniform(0.5, 2.0, n)
    grad, hess = objective(client, loss, **kwargs).gradient_hessian(labels, margins, weights)
    assert grad.shape == hess.shape == margins.shape
    for i in range(n):
        g, h = xgboost_builtin({"objective": builtin, **extra}, np.atleast_1d(margins[i]),
                               labels[i], weights[i])
        np.testing.assert_allclose(np.atleast_1d(grad[i]), g, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.atleast_1d(hess[i]), h, rtol=1e-4, atol=1e-6)


def _synthetic(n: int = 300) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 5))
    classes = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return {
        "x": x,
        "reg:squarederror": x @ rng.normal(size=5) + rng.normal(size=n),
        "reg:pseudohubererror": x @ rng.normal(size=5) + rng.standard_t(2, size=n),
        "binary:logistic": (x[:, 0] + x[:, 2] ** 2 + rng.normal(size=n) > 1).astype(float),
        "multi:softprob": classes.astype(float),
        "weight": rng.uniform(0.5, 2.0, n),
    }


@pytest.mark.parametrize(("builtin", "extra", "loss", "kwargs"), BUILTINS,
                         ids=[b[0] for b in BUILTINS])
def test_xgboost_training_matches_builtin(client: LossClient, builtin, extra, loss, kwargs):
    """Ten rounds with the remote objective give the built-in model's margins to 1e-5
    (float32 rounding of g and h: XGBoost computes them in float32)."""
    data = _synthetic()
    n = data["x"].shape[0]
    width = K if builtin.startswith("multi") else 1
    params = {"max_depth": 3, "eta": 0.3, "tree_method": "hist", "nthread": 1, "seed": 0,
              **extra}

    def dmatrix() -> Any:
        return xgb.DMatrix(data["x"], data[builtin], weight=data["weight"],
                           base_margin=np.zeros((n, width)))

    remote = objective(client, loss, **kwargs)
    custom = {k: v for k, v in params.items() if k != "huber_slope"}  # a built-in's parameter
    mine = xgb.train({**custom, "disable_default_eval_metric": 1}, dmatrix(), 10, obj=remote)
    theirs = xgb.train({**params, "objective": builtin}, dmatrix(), 10)
    ours, expected = (b.predict(dmatrix(), output_margin=True) for b in (mine, theirs))
    assert remote.calls == 10 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.abs(expected).max() > 1.0  # the model moved away from its base margin


LIGHTGBM = [
    ("regression", {}, "reg:squarederror", "mse", {"scale": 0.5}),
    ("binary", {}, "binary:logistic", "binary_cross_entropy",
     {"from_logits": True, "hessian": "exact"}),
    ("multiclass", {"num_class": K}, "multi:softprob", "sparse_categorical_cross_entropy",
     {"from_logits": True, "hessian": "exact", "hessian_scale": K / (K - 1)}),
]


@pytest.mark.parametrize(("builtin", "extra", "labels", "loss", "kwargs"), LIGHTGBM,
                         ids=[b[0] for b in LIGHTGBM])
def test_lightgbm_training_matches_builtin(client: LossClient, builtin, extra, labels, loss,
                                           kwargs):
    """Margins equal to 1e-6 (LightGBM keeps gradients and Hessians in float32, the
    server returns float64; without weights the two are often bit-identical)."""
    data = _synthetic()
    params = {"num_leaves": 7, "learning_rate": 0.3, "num_threads": 1, "verbose": -1,
              "seed": 0, "deterministic": True, "boost_from_average": False, **extra}

    def dataset() -> Any:
        return lgb.Dataset(data["x"], data[labels], weight=data["weight"],
                           free_raw_data=False)

    remote = objective(client, loss, **kwargs)
    mine = lgb.train({**params, "objective": remote}, dataset(), 10)
    theirs = lgb.train({**params, "objective": builtin}, dataset(), 10)
    ours, expected = (b.predict(data["x"], raw_score=True) for b in (mine, theirs))
    assert remote.calls == 10 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert np.abs(expected).max() > 1.0


def test_sklearn_signatures_through_the_libraries_wrappers(client: LossClient):
    """XGBoost's and LightGBM's scikit-learn wrappers call ``obj.sklearn`` with the
    weights (by name, and third); the result is that of the native call."""
    from lightgbm.sklearn import _ObjectiveFunctionWrapper
    from xgboost.sklearn import _objective_decorator

    data = _synthetic(50)
    y, w = data["binary:logistic"], data["weight"]
    margins = np.random.default_rng(3).normal(size=50)
    remote = objective(client, "binary_cross_entropy", from_logits=True)
    native = remote(margins, xgb.DMatrix(data["x"], y, weight=w))
    for grad_hess in (
        _objective_decorator(remote.sklearn)(margins, xgb.DMatrix(data["x"], y, weight=w)),
        _ObjectiveFunctionWrapper(remote.sklearn)(margins, lgb.Dataset(data["x"], y, weight=w)
                                                  .construct()),
    ):
        np.testing.assert_array_equal(grad_hess[0], native[0])
        np.testing.assert_array_equal(grad_hess[1], native[1])
    unweighted = remote.sklearn(y, margins)
    s = 1.0 / (1.0 + np.exp(-margins))
    np.testing.assert_allclose(unweighted[0], s - y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(unweighted[1], s * (1 - s), rtol=1e-12)


def test_label_layouts(client: LossClient):
    """Class indices become one-hot rows for a dense class loss, and labels of a
    multi-output elementwise loss take the predictions' shape."""
    rng = np.random.default_rng(4)
    margins = rng.normal(size=(6, K))
    labels = rng.integers(0, K, 6).astype(np.float64)
    dense = objective(client, "categorical_cross_entropy", from_logits=True)
    sparse = objective(client, "sparse_categorical_cross_entropy", from_logits=True)
    for a, b in zip(dense.gradient_hessian(labels, margins),
                    sparse.gradient_hessian(labels, margins), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    targets = rng.normal(size=(6, K))
    grad, hess = objective(client, "mse", hessian="exact").gradient_hessian(
        targets.ravel(), margins)
    np.testing.assert_allclose(grad, 2 * (margins - targets), rtol=1e-12)
    np.testing.assert_array_equal(hess, np.full((6, K), 2.0))


def test_constant_hessian_for_l1(client: LossClient):
    grad, hess = objective(client, "mae", hessian="constant").gradient_hessian(
        np.zeros(4), np.array([-2.0, -0.5, 0.5, 3.0]), np.array([1.0, 2.0, 1.0, 0.5]))
    np.testing.assert_array_equal(grad, [-1.0, -2.0, 1.0, 0.5])
    np.testing.assert_array_equal(hess, [1.0, 2.0, 1.0, 0.5])


def test_errors_name_the_field(client: LossClient):
    with pytest.raises(InvalidArgumentError) as info:
        objective(client, "no_such_loss").gradient_hessian(np.zeros(2), np.zeros(2))
    assert (info.value.field, info.value.reason) == ("loss", "UNKNOWN_LOSS")
    with pytest.raises(InvalidArgumentError) as info:
        objective(client, "rmse").gradient_hessian(np.zeros(2), np.ones(2))
    assert (info.value.field, info.value.reason) == ("hessian", "HESSIAN_NOT_SUPPORTED")
