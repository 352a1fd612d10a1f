"""Values and gradients of ``lossgrad.compute`` against the float64 NumPy reference.

Every loss (canonical names and aliases, with parameter variants) x reduction x dtype x
sample-weight layout: the value is compared to ``reference.expected``; the float64
gradient to central finite differences of ``compute``'s own loss; the float32 gradient to
the float64 gradient of the same (upcast) inputs. Inputs are random with fixed seeds and
kept away from kinks and clamps; the conventions there are tested in
``test_numerics_edges.py``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import reference as ref
from lossgrad import Reduction, compute

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float64, np.float32)
ELEMENTWISE_SHAPES = ((7,), (5, 3), (4, 2, 3))
CLASS_SHAPES = ((6, 5), (2, 3, 4))

# Value tolerances against the float64 reference. Plain arithmetic: 1e-12; logs,
# log-sum-exp and clamps: 1e-10. float32: 1e-6 relative (the spec's promise for float64
# accumulation of float32 inputs).
RTOL_ARITHMETIC = 1e-12
RTOL_LOGS = 1e-10
RTOL_FLOAT32 = 1e-6
# Finite differences (float64): central, step 1e-6 * max(1, |x|).
FD_STEP = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-8  # times max(1, |loss|, max |gradient|): roundoff of the differenced loss
# float32 gradient against the float64 gradient of the same inputs.
GRAD32_RTOL = 1e-5
GRAD32_ATOL = 1e-6  # times max |float64 gradient|


@dataclass(frozen=True)
class Case:
    """One loss configuration: name, parameters, and how its inputs are drawn."""

    loss: str
    inputs: str
    params: dict = field(default_factory=dict)
    target_dtype: str | None = None  # integer/float label dtype, else predictions' dtype

    @property
    def id(self) -> str:
        parts = [self.loss, self.inputs]
        parts += [f"{k}={v}" for k, v in self.params.items() if k != "class_weight"]
        if "class_weight" in self.params:
            parts.append("class_weight")
        if self.target_dtype:
            parts.append(self.target_dtype)
        return "-".join(parts)


ELEMENTWISE_CASES = (
    Case("mae", "values"),
    Case("l1", "values"),
    Case("mse", "values"),
    Case("l2", "values"),
    Case("rmse", "values"),
    Case("huber", "values"),
    Case("huber", "values", {"delta": 0.5}),
    Case("huber", "values", {"delta": 2.0}),
    Case("pseudo_huber", "values"),
    Case("pseudo_huber", "values", {"delta": 0.3}),
    Case("pseudo_huber", "values", {"delta": 3.0}),
    Case("hinge", "signed"),
    Case("hinge", "binary", target_dtype="int32"),
    Case("hinge", "binary"),
    Case("squared_hinge", "signed"),
    Case("squared_hinge", "binary", target_dtype="int64"),
    Case("binary_cross_entropy", "probabilities"),
    Case("binary_cross_entropy", "probabilities", {"pos_weight": 3.0}),
    Case("binary_cross_entropy", "probabilities", {"label_smoothing": 0.1}),
    Case("binary_cross_entropy", "probabilities", {"pos_weight": 0.5, "label_smoothing": 0.2}),
    Case("binary_cross_entropy", "logits", {"from_logits": True}),
    Case("binary_cross_entropy", "logits", {"from_logits": True, "pos_weight": 3.0}),
    Case("sigmoid_cross_entropy", "logits"),
    Case("sigmoid_cross_entropy", "logits", {"pos_weight": 2.0, "label_smoothing": 0.1}),
)

CW = "cw"  # placeholder: class weights of length C are made per shape

CLASS_CASES = (
    Case("categorical_cross_entropy", "probability_rows"),
    Case("categorical_cross_entropy", "probability_rows", {"label_smoothing": 0.1}),
    Case("categorical_cross_entropy", "logit_rows", {"from_logits": True}),
    Case("categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "label_smoothing": 0.2}),
    Case("sparse_categorical_cross_entropy", "probability_rows", target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "probability_rows",
         {"label_smoothing": 0.1}, target_dtype="int32"),
    Case("sparse_categorical_cross_entropy", "probability_rows",
         {"ignore_index": -100, "label_smoothing": 0.1, "class_weight": CW},
         target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "logit_rows", {"from_logits": True},
         target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "ignore_index": -100}, target_dtype="int32"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "ignore_index": 1}, target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "class_weight": CW}, target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "label_smoothing": 0.1}, target_dtype="int64"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "label_smoothing": 0.15, "class_weight": CW},
         target_dtype="int32"),
    Case("sparse_categorical_cross_entropy", "logit_rows",
         {"from_logits": True, "ignore_index": 2, "label_smoothing": 0.1, "class_weight": CW},
         target_dtype="int64"),
    Case("kl_divergence", "probability_rows"),
    Case("kl_divergence", "log_rows", {"log_predictions": True}),
)


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _class_weight(n_classes: int) -> list[float]:
    return [0.5 + 0.75 * k for k in range(n_classes)]


def _rows(rng: np.random.Generator, shape: tuple[int, ...], low: float) -> np.ndarray:
    """Random probability rows along the last axis, every entry >= low / C."""
    u = rng.uniform(low, 1.0, size=shape)
    return u / u.sum(axis=-1, keepdims=True)


def make_inputs(case: Case, shape: tuple[int, ...], dtype, rng: np.random.Generator):
    """Predictions (dtype) and targets for a case, away from kinks and clamps."""
    name, params = ref.canonical(case.loss)
    params = {**params, **case.params}
    tdtype = np.dtype(case.target_dtype) if case.target_dtype else np.dtype(dtype)
    if case.inputs == "values":
        predictions = rng.normal(0.0, 2.0, size=shape)
        r = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 3.0, size=shape)
        delta = params.get("delta", 1.0)
        if name == "huber":  # keep |r| at least 0.05 from the kink at delta
            near = np.abs(np.abs(r) - delta) < 0.05
            r = np.where(near, r + 0.1 * np.sign(r), r)
        targets = predictions - r
    elif case.inputs in ("signed", "binary"):
        signed = rng.choice([-1.0, 1.0], size=shape)
        signed.flat[0], signed.flat[-1] = -1.0, 1.0  # both labels present
        margin = 1.0 + rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 1.5, size=shape)
        predictions = signed * margin  # y p = margin, at least 0.1 from the kink at 1
        targets = (signed + 1.0) / 2.0 if case.inputs == "binary" else signed
    elif case.inputs == "probabilities":
        predictions = rng.uniform(0.05, 0.95, size=shape)
        hard = rng.integers(0, 2, size=shape).astype(np.float64)
        targets = np.where(rng.random(size=shape) < 0.5, hard, rng.random(size=shape))
    elif case.inputs == "logits":
        predictions = rng.normal(0.0, 3.0, size=shape)
        hard = rng.integers(0, 2, size=shape).astype(np.float64)
        targets = np.where(rng.random(size=shape) < 0.5, hard, rng.random(size=shape))
    elif case.inputs in ("probability_rows", "logit_rows", "log_rows"):
        n_classes = shape[-1]
        if case.inputs == "probability_rows":
            predictions = _rows(rng, shape, 0.25)
        elif case.inputs == "log_rows":
            predictions = np.log(_rows(rng, shape, 0.25))
        else:
            predictions = rng.normal(0.0, 2.0, size=shape)
        if name == "sparse_categorical_cross_entropy":
            targets = rng.integers(0, n_classes, size=shape[:-1])
            ignore = params.get("ignore_index")
            if ignore is not None:
                targets = np.where(rng.random(size=shape[:-1]) < 0.3, ignore, targets)
                targets.flat[0] = (ignore + 1) % n_classes  # at least one row counts
        else:
            targets = _rows(rng, shape, 0.0) ** 2
            targets /= targets.sum(axis=-1, keepdims=True)
            flat = targets.reshape(-1, n_classes)
            flat[0] = np.eye(n_classes)[1]  # a one-hot row: zeros in the targets
            flat[-1, 0] = 0.0
            flat[-1] /= flat[-1].sum()
    else:  # pragma: no cover - a typo in a Case
        raise AssertionError(case.inputs)
    return np.asarray(predictions, dtype=dtype), np.asarray(targets).astype(tdtype)


def make_params(case: Case, shape: tuple[int, ...]) -> dict:
    return {k: (_class_weight(shape[-1]) if v == CW else v) for k, v in case.params.items()}


def make_sample_weight(layout: str | None, pos_shape, dtype, rng: np.random.Generator):
    if layout is None:
        return None
    w_shape = pos_shape[:1] if layout == "batch" else pos_shape
    w = rng.uniform(0.2, 2.0, size=w_shape)
    if w.size > 2:
        w.flat[1] = 0.0  # one position (or batch row) that does not count
    return w.astype(dtype)


def rtol_for(loss: str, dtype) -> float:
    if np.dtype(dtype) == np.float32:
        return RTOL_FLOAT32
    name = ref.canonical(loss)[0]
    if name in ("binary_cross_entropy", "categorical_cross_entropy",
                "sparse_categorical_cross_entropy", "kl_divergence"):
        return RTOL_LOGS
    return RTOL_ARITHMETIC


def total(result_loss) -> float:
    """The scalar the gradient belongs to: the loss, or the sum of NONE's values."""
    if isinstance(result_loss, np.ndarray):
        return math.fsum(np.asarray(result_loss, dtype=np.float64).ravel())
    return float(result_loss)


def finite_difference(f, x: np.ndarray) -> np.ndarray:
    """Central differences of f at x (float64), step FD_STEP * max(1, |x_i|)."""
    grad = np.empty_like(x)
    for i in range(x.size):
        h = FD_STEP * max(1.0, abs(float(x.flat[i])))
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        grad.flat[i] = (f(xp) - f(xm)) / (xp.flat[i] - xm.flat[i])
    return grad


def assert_loss_matches(actual, exp: ref.Expected, rtol: float, dtype) -> None:
    if isinstance(exp.loss, np.ndarray):
        assert isinstance(actual, np.ndarray)
        assert actual.dtype == np.dtype(dtype)
        assert actual.shape == exp.loss.shape
        np.testing.assert_allclose(actual.astype(np.float64), exp.loss, rtol=rtol, atol=0)
    else:
        assert isinstance(actual, float)
        assert actual == pytest.approx(exp.loss, rel=rtol, abs=0)


def _class_params():
    for case in CLASS_CASES:
        for shape in CLASS_SHAPES:
            yield case, shape


def _elementwise_params():
    for case in ELEMENTWISE_CASES:
        for shape in ELEMENTWISE_SHAPES:
            yield case, shape


def _weight_layouts(case: Case, shape) -> tuple[str | None, ...]:
    """None, batch weights (N,), and full per-position weights where those differ."""
    pos_shape = ref.position_shape(case.loss, shape)
    return (None, "batch", "full") if len(pos_shape) > 1 else (None, "batch")


CASES = [
    pytest.param(case, shape, weights,
                 id=f"{case.id}-{'x'.join(map(str, shape))}-w{weights or 'none'}")
    for case, shape in (*_elementwise_params(), *_class_params())
    for weights in _weight_layouts(case, shape)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("case", "shape", "weights"), CASES)
def test_value_and_gradient(case: Case, shape, weights, reduction, dtype):
    rng = np.random.default_rng(_seed(case.id, shape, weights))
    predictions, targets = make_inputs(case, shape, dtype, rng)
    pos_shape = ref.position_shape(case.loss, shape)
    sample_weight = make_sample_weight(weights, pos_shape, dtype, rng)
    params = make_params(case, shape)

    r = compute(case.loss, predictions, targets, reduction=reduction,
                sample_weight=sample_weight, **params)
    exp = ref.expected(case.loss, predictions, targets, reduction=reduction,
                       sample_weight=sample_weight, **params)

    assert_loss_matches(r.loss, exp, rtol_for(case.loss, dtype), dtype)
    assert r.positions == exp.positions
    assert r.positions_counted == exp.positions_counted
    assert r.weight_sum == pytest.approx(exp.weight_sum, rel=1e-12, abs=0)

    assert r.gradient is not None
    assert r.gradient.shape == predictions.shape
    assert r.gradient.dtype == predictions.dtype
    # Positions that do not count (weight 0 or ignored) get exactly zero gradient.
    uncounted = ref.position_weights(sample_weight, pos_shape) == 0.0
    if ref.canonical(case.loss)[0] == "sparse_categorical_cross_entropy":
        ignore = params.get("ignore_index")
        if ignore is not None:
            uncounted |= targets == ignore
    g_rows = r.gradient.reshape(pos_shape + (-1,))
    assert np.all(g_rows[uncounted] == 0.0)

    if np.dtype(dtype) == np.float64:

        def f(x):
            return total(compute(case.loss, x, targets, reduction=reduction,
                                 sample_weight=sample_weight, gradient=False, **params).loss)

        fd = finite_difference(f, predictions)
        scale = max(1.0, abs(total(r.loss)), float(np.max(np.abs(fd))))
        np.testing.assert_allclose(r.gradient, fd, rtol=FD_RTOL, atol=FD_ATOL * scale)
    else:
        sw64 = None if sample_weight is None else sample_weight.astype(np.float64)
        t64 = targets.astype(np.float64) if targets.dtype == np.float32 else targets
        r64 = compute(case.loss, predictions.astype(np.float64), t64, reduction=reduction,
                      sample_weight=sw64, **params)
        g64 = r64.gradient
        np.testing.assert_allclose(r.gradient.astype(np.float64), g64, rtol=GRAD32_RTOL,
                                   atol=GRAD32_ATOL * float(np.max(np.abs(g64))))


# ---------------------------------------------------------------- values at the clamps

CLAMP_CASES = [
    pytest.param("binary_cross_entropy", {}, id="bce"),
    pytest.param("binary_cross_entropy", {"pos_weight": 2.0, "label_smoothing": 0.1},
                 id="bce-pos_weight-smoothing"),
    pytest.param("categorical_cross_entropy", {"label_smoothing": 0.1}, id="cce"),
    pytest.param("sparse_categorical_cross_entropy", {"label_smoothing": 0.1}, id="sparse"),
    pytest.param("kl_divergence", {}, id="kl"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "params"), CLAMP_CASES)
def test_clamped_values_match_reference(loss, params, reduction, dtype):
    # Probabilities with exact zeros and ones (and tiny values under e^-100): every log
    # floored at -100. Values only; the gradient convention there is in the edge tests.
    rng = np.random.default_rng(_seed("clamp", loss, sorted(params)))
    shape = (6, 4)
    p = rng.uniform(0.0, 1.0, size=shape)
    p[rng.random(size=shape) < 0.3] = 0.0
    p[0, :2] = (1e-50, 1e-40) if dtype == np.float64 else (0.0, 1e-40)
    if loss == "binary_cross_entropy":
        p[rng.random(size=shape) < 0.2] = 1.0
        targets = rng.random(size=shape)
        targets[1] = (0.0, 1.0, 0.0, 1.0)
    elif loss == "sparse_categorical_cross_entropy":
        targets = rng.integers(0, shape[-1], size=shape[0])
    else:
        targets = rng.uniform(0.0, 1.0, size=shape) ** 2
        targets[rng.random(size=shape) < 0.2] = 0.0
        targets[:, 0] += 0.1
        targets /= targets.sum(axis=-1, keepdims=True)
    if loss != "sparse_categorical_cross_entropy":
        targets = targets.astype(dtype)
    p = p.astype(dtype)
    sample_weight = rng.uniform(0.5, 2.0, size=shape[0]).astype(dtype)
    r = compute(loss, p, targets, reduction=reduction, sample_weight=sample_weight, **params)
    exp = ref.expected(loss, p, targets, reduction=reduction, sample_weight=sample_weight,
                       **params)
    assert_loss_matches(r.loss, exp, rtol_for(loss, dtype), dtype)


# ---------------------------------------------------------------- aliases and defaults

@pytest.mark.parametrize(("alias", "canonical", "inputs", "params"), [
    ("l1", "mae", "values", {}),
    ("l2", "mse", "values", {}),
    ("sigmoid_cross_entropy", "binary_cross_entropy", "logits", {"from_logits": True}),
])
def test_alias_is_bit_identical_to_canonical(alias, canonical, inputs, params):
    rng = np.random.default_rng(_seed("alias", alias))
    predictions, targets = make_inputs(Case(canonical, inputs, params), (5, 3), np.float64, rng)
    a = compute(alias, predictions, targets)
    b = compute(canonical, predictions, targets, **params)
    assert a.loss == b.loss
    assert a.gradient.tobytes() == b.gradient.tobytes()


@pytest.mark.parametrize(("loss", "inputs", "params"), [
    ("huber", "values", {"delta": 1.0}),
    ("pseudo_huber", "values", {"delta": 1.0}),
    ("binary_cross_entropy", "probabilities", {"from_logits": False, "label_smoothing": 0.0}),
    ("categorical_cross_entropy", "probability_rows", {"from_logits": False}),
    ("kl_divergence", "probability_rows", {"log_predictions": False}),
])
def test_explicit_defaults_change_nothing(loss, inputs, params):
    rng = np.random.default_rng(_seed("defaults", loss))
    predictions, targets = make_inputs(Case(loss, inputs), (6, 5), np.float64, rng)
    a = compute(loss, predictions, targets)
    b = compute(loss, predictions, targets, **params)
    assert a.loss == b.loss
    assert a.gradient.tobytes() == b.gradient.tobytes()


def test_reduction_enum_equals_string():
    rng = np.random.default_rng(_seed("enum"))
    predictions, targets = make_inputs(Case("mse", "values"), (5, 3), np.float64, rng)
    for enum, text in ((Reduction.NONE, "none"), (Reduction.SUM, "sum"),
                       (Reduction.MEAN, "mean")):
        a = compute("mse", predictions, targets, reduction=enum)
        b = compute("mse", predictions, targets, reduction=text)
        np.testing.assert_array_equal(a.loss, b.loss)
        assert a.gradient.tobytes() == b.gradient.tobytes()


def test_default_reduction_is_mean():
    rng = np.random.default_rng(_seed("default-mean"))
    predictions, targets = make_inputs(Case("mae", "values"), (5, 3), np.float64, rng)
    r = compute("mae", predictions, targets)
    assert r.loss == pytest.approx(float(np.mean(np.abs(predictions - targets))), rel=1e-12)


# ---------------------------------------------------------------- cross-check table (section 7)
# Expected numbers from losses-reference.md section 7 ("computed from the formulas above in
# float64"), given there to 7 significant digits.

def test_table_bce_with_logits_pos_weight():
    x = np.array([-2.0, 0.5, 3.0])
    y = np.array([1.0, 0.0, 1.0])
    r = compute("sigmoid_cross_entropy", x, y, reduction="none", pos_weight=3.0)
    np.testing.assert_allclose(r.loss, [6.380784, 0.974077, 0.145762], rtol=1e-6)
    r = compute("binary_cross_entropy", x, y, from_logits=True, pos_weight=3.0)
    assert r.loss == pytest.approx(2.500208, rel=1e-6)
    # g = (1 + (pw - 1) y) sigmoid(x) - pw y (section 4.2), divided by N = 3.
    s = 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(r.gradient, ((1 + 2 * y) * s - 3 * y) / 3, rtol=1e-12)


LOGITS_7 = [2.0, 1.0, 0.0, -1.0, 0.5]


def test_table_softmax_ce_label_smoothing():
    x = np.array([LOGITS_7])
    r = compute("sparse_categorical_cross_entropy", x, np.array([0]), from_logits=True,
                label_smoothing=0.1)
    assert r.loss == pytest.approx(0.7244379, rel=1e-6)
    # The same number from the dense smoothed target (section 4.6).
    dense = compute("categorical_cross_entropy", x, np.eye(5)[:1], from_logits=True,
                    label_smoothing=0.1)
    assert dense.loss == pytest.approx(0.7244379, rel=1e-6)
    assert dense.loss == pytest.approx(r.loss, rel=1e-13)
    np.testing.assert_allclose(dense.gradient, r.gradient, rtol=1e-12, atol=1e-15)


def test_table_softmax_ce_class_weight_label_smoothing_mean():
    x = np.array([LOGITS_7, LOGITS_7])
    r = compute("sparse_categorical_cross_entropy", x, np.array([0, 1]), from_logits=True,
                label_smoothing=0.1, class_weight=[1.0, 2.0, 1.0, 1.0, 1.0])
    assert r.loss == pytest.approx(1.2762825, rel=1e-6)
    assert r.weight_sum == 3.0  # w_0 + w_1
    assert r.positions_counted == 2


def test_table_huber():
    r = compute("huber", np.array([2.5]), np.array([0.0]), delta=2.0)
    assert r.loss == 3.0
    assert r.gradient[0] == 2.0  # clip(r, -delta, delta)


# ---------------------------------------------------------------- hand-checked parameters

def test_hinge_binary_targets_are_mapped():
    p = np.array([0.5, -2.0, 0.3, 2.0])
    r01 = compute("hinge", p, np.array([1, 0, 0, 1], dtype=np.int32), reduction="none")
    rpm = compute("hinge", p, np.array([1.0, -1.0, -1.0, 1.0]), reduction="none")
    # max(0, 1 - y p) with y = [1, -1, -1, 1]
    np.testing.assert_allclose(r01.loss, [0.5, 0.0, 1.3, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(rpm.loss, r01.loss)
    np.testing.assert_array_equal(r01.gradient, [-1.0, 0.0, 1.0, 0.0])


def test_hinge_all_zero_targets_mean_minus_one():
    # Keras: a batch whose labels are all 0 is all -1 (section 3.1).
    p = np.array([0.5, -2.0])
    r = compute("squared_hinge", p, np.zeros(2), reduction="none")
    np.testing.assert_array_equal(r.loss, [2.25, 0.0])  # (1 + 0.5)^2, max(0, 1 - 2)^2
    np.testing.assert_array_equal(r.gradient, [3.0, 0.0])  # 2 max(0, 1 - y p) * (-y)


def test_bce_label_smoothing_keras():
    # y' = y (1 - eps) + eps / 2 (Keras BinaryCrossentropy, section 4.6): eps=0.2, y=1 -> 0.9
    p = np.array([0.7])
    r = compute("binary_cross_entropy", p, np.array([1.0]), label_smoothing=0.2)
    assert r.loss == pytest.approx(-(0.9 * math.log(0.7) + 0.1 * math.log(0.3)), rel=1e-14)
    assert r.gradient[0] == pytest.approx(-0.9 / 0.7 + 0.1 / 0.3, rel=1e-13)


def test_bce_pos_weight_on_probabilities():
    p = np.array([0.2, 0.6])
    y = np.array([1.0, 0.0])
    r = compute("binary_cross_entropy", p, y, reduction="sum", pos_weight=4.0)
    assert r.loss == pytest.approx(-4.0 * math.log(0.2) - math.log(0.4), rel=1e-14)
    np.testing.assert_allclose(r.gradient, [-4.0 / 0.2, 1.0 / 0.4], rtol=1e-14)


def test_categorical_label_smoothing_keras():
    # q' = (1 - eps) q + eps / C, eps=0.3, C=3: one-hot [0, 1, 0] -> [0.1, 0.8, 0.1]
    p = np.array([[0.2, 0.5, 0.3]])
    q = np.array([[0.0, 1.0, 0.0]])
    r = compute("categorical_cross_entropy", p, q, label_smoothing=0.3)
    want = -(0.1 * math.log(0.2) + 0.8 * math.log(0.5) + 0.1 * math.log(0.3))
    assert r.loss == pytest.approx(want, rel=1e-14)
    np.testing.assert_allclose(r.gradient, [[-0.1 / 0.2, -0.8 / 0.5, -0.1 / 0.3]], rtol=1e-14)


def test_sparse_ignore_index_weighted_mean():
    # Rows 0 and 2 count with class weights 1 and 3; row 1 is ignored.
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    y = np.array([0, 7, 2])
    r = compute("sparse_categorical_cross_entropy", p, y, ignore_index=7,
                class_weight=[1.0, 2.0, 3.0])
    want = (-1.0 * math.log(0.5) - 3.0 * math.log(0.6)) / 4.0
    assert r.loss == pytest.approx(want, rel=1e-13)
    assert (r.positions, r.positions_counted, r.weight_sum) == (3, 2, 4.0)
    np.testing.assert_allclose(
        r.gradient, [[-1.0 / 0.5 / 4, 0, 0], [0, 0, 0], [0, 0, -3.0 / 0.6 / 4]], rtol=1e-13)


def test_sparse_class_weight_and_sample_weight_multiply():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    y = np.array([1, 1, 0])
    sw = np.array([2.0, 0.5, 1.0])
    cw = [3.0, 5.0]
    r = compute("sparse_categorical_cross_entropy", x, y, from_logits=True,
                sample_weight=sw, class_weight=cw, reduction="none")
    nll = [math.log1p(math.e), math.log1p(math.exp(-2.0)), math.log(2.0)]
    np.testing.assert_allclose(r.loss, [2 * 5 * nll[0], 0.5 * 5 * nll[1], 1 * 3 * nll[2]],
                               rtol=1e-13)
    assert r.weight_sum == 2 * 5 + 0.5 * 5 + 3


def test_kl_both_modes_agree():
    rng = np.random.default_rng(_seed("kl-modes"))
    q = _rows(rng, (4, 6), 0.1)
    p = _rows(rng, (4, 6), 0.0)
    a = compute("kl_divergence", q, p, reduction="sum")
    b = compute("kl_divergence", np.log(q), p, reduction="sum", log_predictions=True)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    # Chain rule: d/dq = d/dlog q / q, and d/dlog q = -p (section 4.7).
    np.testing.assert_allclose(b.gradient, -p, rtol=1e-14)
    np.testing.assert_allclose(a.gradient, -p / q, rtol=1e-13)


def test_kl_mean_is_batchmean():
    q = np.array([[0.5, 0.5], [0.9, 0.1]])
    p = np.array([[0.25, 0.75], [0.5, 0.5]])
    kl = [0.25 * math.log(0.5) + 0.75 * math.log(1.5),
          0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0)]
    r = compute("kl_divergence", q, p)
    assert r.loss == pytest.approx((kl[0] + kl[1]) / 2, rel=1e-13)


def test_rmse_weighted_reductions():
    p = np.array([[1.0, 2.0], [3.0, 5.0]])
    y = np.array([[0.0, 2.0], [1.0, 1.0]])  # r^2 = [[1, 0], [4, 16]]
    w = np.array([2.0, 0.5])  # batch weights
    mean = compute("rmse", p, y, sample_weight=w)
    assert mean.loss == pytest.approx(math.sqrt((2 * 1 + 0.5 * 20) / 5.0), rel=1e-14)
    assert mean.weight_sum == 5.0
    s = compute("rmse", p, y, sample_weight=w, reduction="sum")
    assert s.loss == pytest.approx(math.sqrt(12.0), rel=1e-14)
    none = compute("rmse", p, y, sample_weight=w, reduction="none")
    np.testing.assert_allclose(none.loss, np.sqrt([[2.0, 0.0], [2.0, 8.0]]), rtol=1e-14)
    # g_i = w_i r_i / (sum w * R) (section 2.3)
    big_r = math.sqrt(12.0 / 5.0)
    want = np.array([[2 * 1, 0], [0.5 * 2, 0.5 * 4]]) / (5.0 * big_r)
    np.testing.assert_allclose(mean.gradient, want, rtol=1e-13)


def test_pseudo_huber_delta():
    r = compute("pseudo_huber", np.array([3.0]), np.array([-1.0]), delta=3.0)
    # delta^2 (sqrt(1 + (4/3)^2) - 1) = 9 (5/3 - 1) = 6; g = r / sqrt(1 + (r/delta)^2) = 2.4
    assert r.loss == pytest.approx(6.0, rel=1e-14)
    assert r.gradient[0] == pytest.approx(2.4, rel=1e-14)
