"""Bad input to the in-process engine: InvalidArgumentError with the field and the reason.

Each case names the request field the error must point at (a prefix: the engine may add
``.shape``, ``.dtype``, ``.data[i]``) and the stable reason from ``lossgrad.errors``.
Accepted neighbours of rejected inputs (ignore_index, from_logits, allow_nonfinite) are
checked against hand-computed values.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from lossgrad import InvalidArgumentError, LossgradError, Reduction, Result, compute
from lossgrad.errors import (
    EMPTY_BATCH,
    INVALID_LABELS,
    LABEL_OUT_OF_RANGE,
    NONFINITE_INPUT,
    PARAMETER_OUT_OF_RANGE,
    SHAPE_MISMATCH,
    UNKNOWN_LOSS,
    UNKNOWN_PARAMETER,
    UNKNOWN_REDUCTION,
    UNSUPPORTED_DTYPE,
    VALUE_OUT_OF_RANGE,
)
from lossgrad.kernels import drivers

V3 = np.array([0.2, 0.5, 0.7])  # valid values, probabilities and logits
T3 = np.array([0.0, 1.0, 1.0])  # valid targets for every elementwise loss
ROWS = np.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])  # probability rows, C = 3
LABELS = np.array([2, 0])


def _case(id_, field, reason, loss, predictions, targets, **kw):
    return pytest.param(loss, predictions, targets, kw, field, reason, id=id_)


CASES = [
    # loss, reduction
    _case("unknown-loss", "loss", UNKNOWN_LOSS, "cosine", V3, T3),
    _case("unknown-reduction", "reduction", UNKNOWN_REDUCTION, "mse", V3, T3,
          reduction="avg"),
    _case("unknown-reduction-batchmean", "reduction", UNKNOWN_REDUCTION, "kl_divergence",
          ROWS, ROWS, reduction="batchmean"),
    # parameters
    _case("delta-for-mse", "params.delta", UNKNOWN_PARAMETER, "mse", V3, T3, delta=1.0),
    _case("delta-for-l1", "params.delta", UNKNOWN_PARAMETER, "l1", V3, T3, delta=1.0),
    _case("unknown-param", "params.beta", UNKNOWN_PARAMETER, "huber", V3, T3, beta=1.0),
    _case("class-weight-for-cce", "params.class_weight", UNKNOWN_PARAMETER,
          "categorical_cross_entropy", ROWS, ROWS, class_weight=[1.0, 1.0, 1.0]),
    _case("smoothing-for-kl", "params.label_smoothing", UNKNOWN_PARAMETER, "kl_divergence",
          ROWS, ROWS, label_smoothing=0.1),
    _case("delta-zero", "params.delta", PARAMETER_OUT_OF_RANGE, "huber", V3, T3, delta=0.0),
    _case("delta-negative", "params.delta", PARAMETER_OUT_OF_RANGE, "pseudo_huber", V3, T3,
          delta=-1.0),
    _case("delta-nan", "params.delta", PARAMETER_OUT_OF_RANGE, "huber", V3, T3,
          delta=float("nan")),
    _case("pos-weight-zero", "params.pos_weight", PARAMETER_OUT_OF_RANGE,
          "binary_cross_entropy", V3, T3, pos_weight=0.0),
    _case("bce-smoothing-1", "params.label_smoothing", PARAMETER_OUT_OF_RANGE,
          "binary_cross_entropy", V3, T3, label_smoothing=1.0),
    _case("bce-smoothing-negative", "params.label_smoothing", PARAMETER_OUT_OF_RANGE,
          "sigmoid_cross_entropy", V3, T3, label_smoothing=-0.1),
    _case("cce-smoothing-1", "params.label_smoothing", PARAMETER_OUT_OF_RANGE,
          "categorical_cross_entropy", ROWS, ROWS, label_smoothing=1.0),
    _case("sparse-smoothing-negative", "params.label_smoothing", PARAMETER_OUT_OF_RANGE,
          "sparse_categorical_cross_entropy", ROWS, LABELS, label_smoothing=-0.1),
    _case("class-weight-negative", "params.class_weight", PARAMETER_OUT_OF_RANGE,
          "sparse_categorical_cross_entropy", ROWS, LABELS, class_weight=[1.0, -1.0, 1.0]),
    # dtypes
    _case("int-predictions", "predictions", UNSUPPORTED_DTYPE, "mse",
          np.array([1, 2, 3]), T3),
    _case("complex-predictions", "predictions", UNSUPPORTED_DTYPE, "mse",
          V3.astype(np.complex64), T3),
    _case("bool-predictions", "predictions", UNSUPPORTED_DTYPE, "mae",
          np.array([True, False, True]), T3),
    _case("float-class-indices", "targets", UNSUPPORTED_DTYPE,
          "sparse_categorical_cross_entropy", ROWS, LABELS.astype(np.float64)),
    _case("string-targets", "targets", UNSUPPORTED_DTYPE, "mse", V3, np.array(["a", "b", "c"])),
    # shapes
    _case("targets-length", "targets", SHAPE_MISMATCH, "mse", V3, np.zeros(4)),
    _case("targets-rank", "targets", SHAPE_MISMATCH, "mae", V3, T3[:, None]),
    _case("dense-targets-classes", "targets", SHAPE_MISMATCH, "categorical_cross_entropy",
          ROWS, ROWS[:, :2]),
    _case("sparse-targets-with-class-axis", "targets", SHAPE_MISMATCH,
          "sparse_categorical_cross_entropy", ROWS, ROWS.astype(np.int64)),
    _case("scalar-predictions", "predictions", SHAPE_MISMATCH, "mse", np.float64(1.0),
          np.float64(0.0)),
    _case("scalar-targets", "targets", SHAPE_MISMATCH, "mse", np.array([1.0]),
          np.float64(0.0)),
    _case("class-loss-1d", "predictions", SHAPE_MISMATCH, "categorical_cross_entropy",
          ROWS[0], ROWS[0]),
    _case("empty-batch", "predictions", EMPTY_BATCH, "mse", np.zeros(0), np.zeros(0)),
    _case("empty-inner-axis", "predictions", EMPTY_BATCH, "mae", np.zeros((3, 0)),
          np.zeros((3, 0))),
    _case("empty-rows", "predictions", EMPTY_BATCH, "categorical_cross_entropy",
          np.zeros((0, 3)), np.zeros((0, 3))),
    _case("empty-sparse", "predictions", EMPTY_BATCH, "sparse_categorical_cross_entropy",
          np.zeros((0, 3)), np.zeros(0, dtype=np.int64)),
    _case("class-weight-length", "params.class_weight", None,
          "sparse_categorical_cross_entropy", ROWS, LABELS, class_weight=[1.0, 2.0]),
    # labels and value ranges
    _case("label-equals-C", "targets", LABEL_OUT_OF_RANGE, "sparse_categorical_cross_entropy",
          ROWS, np.array([3, 0])),
    _case("label-negative", "targets", LABEL_OUT_OF_RANGE, "sparse_categorical_cross_entropy",
          ROWS, np.array([0, -1], dtype=np.int32), from_logits=True),
    _case("label-minus-100-not-ignored", "targets", LABEL_OUT_OF_RANGE,
          "sparse_categorical_cross_entropy", ROWS, np.array([-100, 0])),
    _case("label-out-with-other-ignore", "targets", LABEL_OUT_OF_RANGE,
          "sparse_categorical_cross_entropy", ROWS, np.array([-100, 5]), ignore_index=-100),
    _case("hinge-mixed-labels", "targets", INVALID_LABELS, "hinge", V3,
          np.array([-1.0, 0.0, 1.0])),
    _case("hinge-half", "targets", INVALID_LABELS, "squared_hinge", V3,
          np.array([1.0, 0.5, -1.0])),
    _case("hinge-int-two", "targets", INVALID_LABELS, "hinge", V3, np.array([0, 1, 2])),
    _case("bce-prediction-above-1", "predictions", VALUE_OUT_OF_RANGE, "binary_cross_entropy",
          np.array([0.2, 1.5, 0.7]), T3),
    _case("bce-prediction-negative", "predictions", VALUE_OUT_OF_RANGE,
          "binary_cross_entropy", np.array([0.2, -0.1, 0.7]), T3),
    _case("float64-target-past-float32", "targets[1]", VALUE_OUT_OF_RANGE, "mae",
          V3.astype(np.float32), np.array([0.0, 3.5e38, 1.0])),
    _case("float64-variance-past-float32", "variance[2]", VALUE_OUT_OF_RANGE, "gaussian_nll",
          V3.astype(np.float32), T3.astype(np.float32), variance=np.array([1.0, 1.0, -1e39])),
    _case("bce-target-above-1", "targets", VALUE_OUT_OF_RANGE, "binary_cross_entropy", V3,
          np.array([0.0, 1.2, 1.0])),
    _case("bce-logits-target-negative", "targets", VALUE_OUT_OF_RANGE,
          "sigmoid_cross_entropy", V3, np.array([0.0, -0.5, 1.0])),
    _case("kl-target-negative", "targets", VALUE_OUT_OF_RANGE, "kl_divergence", ROWS,
          np.array([[-0.1, 0.6, 0.5], [0.2, 0.3, 0.5]])),
    _case("kl-prediction-above-1", "predictions", VALUE_OUT_OF_RANGE, "kl_divergence",
          np.array([[1.5, 0.3, 0.5], [0.2, 0.3, 0.5]]), ROWS),
    _case("cce-target-negative", "targets", VALUE_OUT_OF_RANGE, "categorical_cross_entropy",
          ROWS, np.array([[-0.1, 0.6, 0.5], [0.2, 0.3, 0.5]]), from_logits=True),
    _case("cce-prediction-negative", "predictions", VALUE_OUT_OF_RANGE,
          "categorical_cross_entropy", np.array([[-0.1, 0.6, 0.5], [0.2, 0.3, 0.5]]), ROWS),
    _case("sparse-prediction-above-1", "predictions", VALUE_OUT_OF_RANGE,
          "sparse_categorical_cross_entropy", np.array([[1.5, 0.3, 0.5], [0.2, 0.3, 0.5]]),
          LABELS),
    # non-finite inputs
    _case("nan-predictions", "predictions", NONFINITE_INPUT, "mse",
          np.array([0.2, np.nan, 0.7]), T3),
    _case("inf-predictions", "predictions", NONFINITE_INPUT, "sigmoid_cross_entropy",
          np.array([0.2, np.inf, 0.7]), T3),
    _case("nan-targets", "targets", NONFINITE_INPUT, "mae", V3, np.array([0.0, np.nan, 1.0])),
    _case("inf-log-predictions", "predictions", NONFINITE_INPUT, "kl_divergence",
          np.log(ROWS) - np.array([[np.inf, 0.0, 0.0], [0.0, 0.0, 0.0]]), ROWS,
          log_predictions=True),
    # sample weights
    _case("negative-weight", "sample_weight", VALUE_OUT_OF_RANGE, "mse", V3, T3,
          sample_weight=np.array([1.0, -0.5, 1.0])),
    _case("weight-length", "sample_weight", SHAPE_MISMATCH, "mse", V3, T3,
          sample_weight=np.ones(4)),
    _case("weight-rank", "sample_weight", SHAPE_MISMATCH, "mse", V3, T3,
          sample_weight=np.ones((3, 1))),
    _case("weight-with-class-axis", "sample_weight", SHAPE_MISMATCH,
          "categorical_cross_entropy", ROWS, ROWS, sample_weight=np.ones((2, 3))),
    _case("weight-nan", "sample_weight", None, "mse", V3, T3,
          sample_weight=np.array([1.0, np.nan, 1.0])),
    # aliases
    _case("sigmoid-ce-from-logits-false", "params.from_logits", None, "sigmoid_cross_entropy",
          V3, T3, from_logits=False),
    # parameter types
    _case("delta-not-a-number", "params.delta", None, "huber", V3, T3, delta="big"),
    _case("from-logits-not-bool", "params.from_logits", None, "binary_cross_entropy", V3, T3,
          from_logits="yes"),
    _case("ignore-index-not-int", "params.ignore_index", None,
          "sparse_categorical_cross_entropy", ROWS, LABELS, ignore_index=1.5),
]


@pytest.mark.parametrize(("loss", "predictions", "targets", "kw", "field", "reason"), CASES)
def test_rejected(loss, predictions, targets, kw, field, reason):
    with pytest.raises(InvalidArgumentError) as info:
        compute(loss, predictions, targets, **kw)
    err = info.value
    assert err.field.startswith(field), err.field
    if reason is not None:
        assert err.reason == reason, (err.reason, str(err))
    else:  # the spec names the field but not one reason
        assert err.reason in (PARAMETER_OUT_OF_RANGE, SHAPE_MISMATCH, VALUE_OUT_OF_RANGE,
                              NONFINITE_INPUT, UNKNOWN_PARAMETER), err.reason
    assert str(err) == f"{err.field}: {err.message}"
    assert isinstance(err, ValueError) and isinstance(err, LossgradError)


def test_rejected_with_gradient_false_too():
    # Validation does not depend on what is asked for.
    with pytest.raises(InvalidArgumentError) as info:
        compute("binary_cross_entropy", np.array([1.5]), np.array([1.0]), gradient=False)
    assert info.value.reason == VALUE_OUT_OF_RANGE


# ---------------------------------------------------------------- accepted neighbours

def test_ignore_index_accepted():
    # -100 would be out of range; as ignore_index it is ignored: only row 1 counts.
    r = compute("sparse_categorical_cross_entropy", ROWS, np.array([-100, 1]),
                ignore_index=-100)
    assert r.loss == pytest.approx(-math.log(0.2), rel=1e-15)
    assert (r.positions, r.positions_counted, r.weight_sum) == (2, 1, 1.0)


def test_ignore_index_beyond_classes_accepted():
    r = compute("sparse_categorical_cross_entropy", ROWS, np.array([7, 0], dtype=np.int32),
                ignore_index=7, reduction="sum")
    assert r.loss == pytest.approx(-math.log(0.6), rel=1e-15)


def test_ignore_index_inside_classes():
    # ignore_index may be a real class (PyTorch allows it): its rows do not count.
    r = compute("sparse_categorical_cross_entropy", ROWS, LABELS, ignore_index=2)
    assert r.loss == pytest.approx(-math.log(0.6), rel=1e-15)
    assert r.positions_counted == 1


def test_logits_accept_values_outside_unit_interval():
    r = compute("binary_cross_entropy", np.array([1.5, -3.0]), np.array([1.0, 0.0]),
                from_logits=True, reduction="sum")
    # softplus(-1.5) + softplus(-3)
    assert r.loss == pytest.approx(math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-3.0)),
                                   rel=1e-14)


def test_sigmoid_cross_entropy_accepts_its_own_preset():
    a = compute("sigmoid_cross_entropy", V3, T3, from_logits=True)
    b = compute("sigmoid_cross_entropy", V3, T3)
    assert a.loss == b.loss


def test_hinge_labels_in_either_form():
    a = compute("hinge", V3, np.array([0, 1, 1], dtype=np.int64), reduction="none")
    b = compute("hinge", V3, np.array([-1.0, 1.0, 1.0]), reduction="none")
    np.testing.assert_allclose(a.loss, [1.2, 0.5, 0.3], rtol=1e-15)
    np.testing.assert_array_equal(a.loss, b.loss)


@pytest.mark.parametrize(("predictions", "targets", "want"), [
    (np.array([0.2, np.nan, 0.7]), T3, "nan"),
    (np.array([0.2, np.inf, 0.7]), T3, "inf"),
    (V3, np.array([0.0, -np.inf, 1.0]), "inf"),
])
def test_allow_nonfinite(predictions, targets, want):
    r = compute("mse", predictions, targets, allow_nonfinite=True, reduction="sum")
    if want == "nan":
        assert math.isnan(r.loss)
    else:
        assert r.loss == math.inf
    # The finite positions keep their gradient 2 r.
    np.testing.assert_array_equal(r.gradient[[0, 2]], 2.0 * (V3 - T3)[[0, 2]])



@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["predictions", "targets", "both"])
def test_lean_losses_still_reject_every_nonfinite_input(loss, dtype, bad, where):
    """MSE and MAE (and Huber from LEAN_HUBER_MIN elements) sum their losses without
    poison terms (their loss is NaN or Inf whenever an input is): every non-finite input,
    against a finite partner or the same value, must still be found, on the serial and
    the parallel path."""
    for n in (3, 70_000) + ((drivers.LEAN_HUBER_MIN + 5,) if loss == "huber" else ()):
        x = np.full(n, 0.5, dtype=dtype)
        y = np.full(n, -0.25, dtype=dtype)
        k = n - 2
        if where != "targets":
            x[k] = bad
        if where != "predictions":
            y[k] = bad
        with pytest.raises(InvalidArgumentError) as info:
            compute(loss, x, y)
        field = "targets" if where == "targets" else "predictions"
        assert info.value.reason == NONFINITE_INPUT
        assert info.value.field.startswith(field), info.value.field
        assert str(k) in info.value.field


@pytest.mark.parametrize("loss", ["hinge", "squared_hinge"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("labels", "bad", "value"), [
    ("signed", 54_321, 0.5),  # not a label at all
    ("signed", 54_321, 0.0),  # 0 among -1/1
    ("binary", 60_000, -1.0),  # -1 among 0/1
    ("signed", 69_999, np.nan),
])
def test_hinge_labels_name_the_first_offending_index(loss, dtype, labels, bad, value):
    """The label check counts without branches, then scans only labels that fail: the
    error must still name the first offending index, in a long array of random labels."""
    rng = np.random.default_rng(11)
    low = -1.0 if labels == "signed" else 0.0
    y = rng.choice(np.array([low, 1.0]), 70_000).astype(dtype)
    y[bad] = value
    x = rng.standard_normal(70_000).astype(dtype)
    with pytest.raises(InvalidArgumentError) as info:
        compute(loss, x, y)
    assert info.value.reason == INVALID_LABELS
    assert info.value.field == f"targets.data[{bad}]"
    for ok in (y[:bad], np.abs(y[:bad])):  # the labels before it are valid either way
        assert np.isfinite(float(compute(loss, x[:bad], ok).loss))


def test_result_is_the_frozen_dataclass_with_every_field():
    """``compute`` builds its Result without the dataclass constructor: it must still be
    a frozen Result, equal to one built by the constructor, with every field."""
    result = compute("mse", np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    assert type(result) is Result
    assert dataclasses.asdict(result).keys() == {f.name for f in dataclasses.fields(Result)}
    assert result == Result(2.5, result.gradient, 2, 2, 2.0, 5.0)
    assert result.gradient.tolist() == [1.0, 2.0]  # 2 r / 2
    assert result.hessian is None and result.variance_gradient is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.loss = 0.0  # type: ignore[misc]
    for reduction in ("SUM", "Sum", Reduction.SUM):
        assert compute("mse", np.array([1.0, 2.0]), np.array([0.0, 0.0]),
                       reduction=reduction).loss == 5.0
