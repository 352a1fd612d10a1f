"""End to end for the extended catalog: ListLosses describes it, gaussian_nll's variance
travels both ways, and bad parameters or values get INVALID_ARGUMENT naming the field.

A real server on a loopback port through the real client (the session fixtures).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import LossClient
from test_e2e_errors import invalid

pytestmark = pytest.mark.e2e

# name -> (predictions kind, targets kind, {param: (type, default, min, min incl, max, max incl)})
CATALOG = {
    "smooth_l1": ("values", "values", {"beta": ("double", 1.0, 0.0, True, None, True)}),
    "log_cosh": ("values", "values", {}),
    "quantile": ("values", "values", {"quantile": ("double", 0.5, 0.0, False, 1.0, False)}),
    "mape": ("values", "values", {}),
    "msle": ("values", "values", {}),
    "poisson_nll": ("log_rates", "values", {"log_input": ("bool", True, None, True, None, True),
                                            "full": ("bool", False, None, True, None, True)}),
    "tweedie": ("rates", "values", {"power": ("double", 1.5, None, True, None, True)}),
    "gaussian_nll": ("values", "values", {"full": ("bool", False, None, True, None, True)}),
    "sigmoid_focal": ("logits", "probabilities",
                      {"alpha": ("double", 0.25, None, True, 1.0, True),
                       "gamma": ("double", 2.0, 0.0, True, None, True)}),
    "softmax_focal": ("logits", "probabilities",
                      {"alpha": ("double", 0.25, 0.0, True, None, True),
                       "gamma": ("double", 2.0, 0.0, True, None, True)}),
    "nll": ("log_probabilities", "class_indices",
            {"ignore_index": ("int64", None, None, True, None, True),
             "class_weight": ("double_list", None, 0.0, True, None, True),
             "label_smoothing": ("double", 0.0, 0.0, True, 1.0, False)}),
    "multiclass_hinge": ("scores", "class_indices",
                         {"ignore_index": ("int64", None, None, True, None, True),
                          "class_weight": ("double_list", None, 0.0, True, None, True)}),
    "categorical_hinge": ("scores", "values", {}),
    "cosine_similarity": ("values", "values", {}),
}
CLASS_AXIS = {"softmax_focal", "nll", "multiclass_hinge", "categorical_hinge",
              "cosine_similarity"}


def test_list_losses_describes_the_extended_catalog(client: LossClient) -> None:
    infos = {info.name: info for info in client.list_losses()}
    for name, (pred_kind, target_kind, params) in CATALOG.items():
        info = infos[name]
        assert info.predictions.kind == pred_kind, name
        assert info.targets.kind == target_kind, name
        assert info.class_axis_last is (name in CLASS_AXIS), name
        assert info.reference and info.description, name
        assert {p.name for p in info.params} == set(params), name
        for p in info.params:
            kind, default, low, low_incl, high, high_incl = params[p.name]
            assert (p.type, p.default, p.optional) == (kind, default, default is None), p
            assert (p.minimum, p.maximum) == (low, high), p
            if low is not None:
                assert p.minimum_inclusive is low_incl, p
            if high is not None:
                assert p.maximum_inclusive is high_incl, p
        assert (info.variance is not None) is (name == "gaussian_nll"), name
    assert infos["gaussian_nll"].variance.kind == "variances"
    assert {"float32", "float64"} <= set(infos["gaussian_nll"].variance.dtypes)
    assert infos["quantile"].aliases == ("pinball",)
    assert infos["mse"].variance is None


@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("float64", "float32"))
@pytest.mark.parametrize("variance_shape", ((3, 4), (3, 1), (3,)))
def test_gaussian_nll_variance_both_ways(client: LossClient, dtype, variance_shape) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 4)).astype(dtype)
    y = rng.normal(size=(3, 4)).astype(dtype)
    var = rng.uniform(0.5, 2.0, size=variance_shape).astype(dtype)
    remote = client.compute_gradient("gaussian_nll", x, y, variance=var, full=True,
                                     reduction="sum")
    local = compute("gaussian_nll", x, y, variance=var, full=True, reduction="sum")
    assert remote.loss == local.loss
    assert remote.gradient.tobytes() == local.gradient.tobytes()
    assert remote.variance_gradient.shape == variance_shape
    assert remote.variance_gradient.dtype == dtype
    assert remote.variance_gradient.tobytes() == local.variance_gradient.tobytes()
    only_loss = client.compute_loss("gaussian_nll", x, y, variance=var, full=True,
                                    reduction="sum")
    assert only_loss.loss == local.loss
    plain = client.compute_gradient("mse", x, y)
    assert plain.variance_gradient is None


@pytest.mark.parametrize(("loss", "params", "field"), [
    ("smooth_l1", {"beta": -0.5}, "params.beta"),
    ("quantile", {"quantile": 0.0}, "params.quantile"),
    ("quantile", {"quantile": 1.0}, "params.quantile"),
    ("pinball", {"quantile": math.inf}, "params.quantile"),
    ("tweedie", {"power": 0.5}, "params.power"),
    ("tweedie", {"power": math.nan}, "params.power"),
    ("sigmoid_focal", {"alpha": 1.5}, "params.alpha"),
    ("sigmoid_focal", {"gamma": -1.0}, "params.gamma"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.items())))
def test_elementwise_parameter_out_of_range(client: LossClient, loss, params, field) -> None:
    x = np.array([0.5, 1.5])
    invalid(lambda: client.compute_loss(loss, x, np.array([1.0, 1.0]), **params), field,
            "PARAMETER_OUT_OF_RANGE")


@pytest.mark.parametrize(("loss", "params", "field"), [
    ("softmax_focal", {"alpha": -0.1}, "params.alpha"),
    ("softmax_focal", {"gamma": -2.0}, "params.gamma"),
    ("nll", {"label_smoothing": 1.0}, "params.label_smoothing"),
    ("multiclass_hinge", {"class_weight": [1.0, -1.0, 1.0]}, "params.class_weight"),
])
def test_class_parameter_out_of_range(client: LossClient, loss, params, field) -> None:
    x = np.array([[0.5, 1.5, -1.0], [0.0, 0.2, 0.1]])
    t = np.array([0, 2]) if loss in ("nll", "multiclass_hinge") else np.eye(3)[[0, 2]]
    invalid(lambda: client.compute_gradient(loss, x, t, **params), field,
            "PARAMETER_OUT_OF_RANGE")


def test_parameters_of_other_losses_are_unknown(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("mse", [1.0], [1.0], beta=1.0), "params.beta",
            "UNKNOWN_PARAMETER")
    invalid(lambda: client.compute_loss("multiclass_hinge", [[1.0, 0.0]], [0],
                                        label_smoothing=0.1),
            "params.label_smoothing", "UNKNOWN_PARAMETER")


@pytest.mark.parametrize(("loss", "x", "y", "params", "field"), [
    ("poisson_nll", [1.0, -0.5], [1.0, 2.0], {"log_input": False}, "predictions.data[1]"),
    ("tweedie", [1.0, 0.0], [1.0, 2.0], {}, "predictions.data[1]"),
    ("tweedie", [-1.0, 1.0], [1.0, 2.0], {"power": -1.0}, "predictions.data[0]"),
    ("tweedie", [1.0, 2.0], [1.0, -2.0], {"power": 1.0}, "targets.data[1]"),
    ("tweedie", [1.0, 2.0], [0.0, 2.0], {"power": 3.0}, "targets.data[0]"),
    ("tweedie", [1.0, 2.0], [2.0, 0.0], {"power": 2.0}, "targets.data[1]"),
    ("sigmoid_focal", [1.0, 2.0], [1.0, 1.5], {}, "targets.data[1]"),
], ids=("poisson-rate", "tweedie-mean", "tweedie-negative-power", "tweedie-p1-target",
        "tweedie-p3-target", "tweedie-p2-target", "focal-target"))
def test_values_outside_the_domain(client: LossClient, loss, x, y, params, field) -> None:
    err = invalid(lambda: client.compute_gradient(loss, np.array(x), np.array(y), **params),
                  field, "VALUE_OUT_OF_RANGE")
    assert "must be" in err.message or "outside" in err.message


def test_softmax_focal_targets_outside_unit_interval(client: LossClient) -> None:
    bad = np.array([[1.5, -0.5, 0.0], [0.2, 0.3, 0.5]])
    invalid(lambda: client.compute_loss("softmax_focal", np.zeros((2, 3)), bad), "targets",
            "VALUE_OUT_OF_RANGE")


def test_nll_label_out_of_range(client: LossClient) -> None:
    invalid(lambda: client.compute_loss("nll", np.log(np.full((2, 3), 1 / 3)), [0, 3]),
            "targets.data[1]", "LABEL_OUT_OF_RANGE")


def test_variance_errors(client: LossClient) -> None:
    x = np.zeros((2, 3))
    invalid(lambda: client.compute_loss("gaussian_nll", x, x), "variance", "MISSING_FIELD")
    invalid(lambda: client.compute_loss("mse", x, x, variance=np.ones((2, 3))), "variance",
            "UNEXPECTED_FIELD")
    invalid(lambda: client.compute_loss("gaussian_nll", x, x, variance=np.ones((3, 2))),
            "variance.shape", "SHAPE_MISMATCH")
    invalid(lambda: client.compute_loss("gaussian_nll", x, x,
                                        variance=np.array([[1.0], [-1.0]])),
            "variance.data[1]", "VALUE_OUT_OF_RANGE")
    invalid(lambda: client.compute_loss("gaussian_nll", x, x,
                                        variance=np.array([1.0, math.nan])),
            "variance.data[1]", "NONFINITE_INPUT")
    invalid(lambda: client.compute_loss("gaussian_nll", x, x, variance=[[1.0, 1.0]],
                                        allow_nonfinite=True),
            "variance.shape", "SHAPE_MISMATCH")
