"""Degenerate inputs, clamps, kinks, accumulation and reproducibility.

Expected numbers are worked out by hand from the formulas in the loss reference (the
section is named at each test) and, where a float is involved, are exact in float64.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import reference as ref
from lossgrad import compute
from lossgrad.kernels import drivers
from lossgrad.kernels import rows as row_drivers
from lossgrad.kernels._numerics import BLOCK, compile_kernels
from lossgrad.kernels.classification import SPARSE_LOGITS

DTYPES = (np.float64, np.float32)
BIG = 1e4  # largest logit magnitude the spec promises finite results for


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _finite(r) -> None:
    assert np.all(np.isfinite(r.loss))
    assert r.gradient is None or np.all(np.isfinite(r.gradient))


# ---------------------------------------------------------------- extreme logits (section 1.6)

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bce_with_logits_extreme(dtype):
    # l = (1 - y) softplus(x) + y softplus(-x): softplus(1e4) = 1e4, softplus(-1e4) = 0;
    # g = sigmoid(x) - y with sigmoid(1e4) = 1, sigmoid(-1e4) = 0; mean divides by N = 4.
    x = np.array([BIG, -BIG, BIG, -BIG], dtype=dtype)
    y = np.array([0.0, 1.0, 1.0, 0.0], dtype=dtype)
    r = compute("sigmoid_cross_entropy", x, y)
    _finite(r)
    assert r.loss == 5000.0
    np.testing.assert_array_equal(r.gradient, np.array([0.25, -0.25, 0.0, 0.0], dtype))
    none = compute("sigmoid_cross_entropy", x, y, reduction="none")
    np.testing.assert_array_equal(none.loss, np.array([BIG, BIG, 0.0, 0.0], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bce_with_logits_extreme_pos_weight_and_smoothing(dtype):
    x = np.array([-BIG, BIG], dtype=dtype)
    y = np.array([1.0, 0.0], dtype=dtype)
    r = compute("binary_cross_entropy", x, y, from_logits=True, pos_weight=3.0,
                reduction="sum")
    # pw softplus(1e4) = 3e4 for the positive; softplus(1e4) = 1e4 for the negative.
    assert r.loss == 4e4
    # g = (1 + (pw - 1) y) sigmoid(x) - pw y = -3 and 1 (section 4.2)
    np.testing.assert_array_equal(r.gradient, np.array([-3.0, 1.0], dtype))
    # Smoothing eps = 0.1: y' = [0.95, 0.05]; l = y' softplus(-x) + (1 - y') softplus(x)
    s = compute("sigmoid_cross_entropy", x, y, label_smoothing=0.1, reduction="none")
    _finite(s)
    np.testing.assert_allclose(s.loss, [0.95 * BIG, 0.95 * BIG], rtol=1e-7 if
                               dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(s.gradient, [-0.95, 0.95], rtol=1e-7 if
                               dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("loss", ("sparse", "dense"))
def test_softmax_ce_extreme_logits(loss, dtype):
    x = np.array([[BIG, -BIG, 0.0],
                  [BIG, -BIG, 0.0],
                  [BIG, -BIG, 0.0],
                  [BIG, BIG, BIG],
                  [-BIG, -BIG, -BIG]], dtype=dtype)
    labels = np.array([0, 1, 2, 2, 0])
    # LSE rows: 1e4, 1e4, 1e4, 1e4 + log 3, -1e4 + log 3; l = LSE - x_y.
    want = np.array([0.0, 2 * BIG, BIG, math.log(3.0), math.log(3.0)])
    third = 1.0 / 3.0
    want_grad = np.array([[0.0, 0.0, 0.0],
                          [1.0, -1.0, 0.0],
                          [1.0, 0.0, -1.0],
                          [third, third, third - 1.0],
                          [third - 1.0, third, third]])  # softmax - onehot
    if loss == "sparse":
        r = compute("sparse_categorical_cross_entropy", x, labels, from_logits=True,
                    reduction="none")
    else:
        r = compute("categorical_cross_entropy", x, np.eye(3, dtype=dtype)[labels],
                    from_logits=True, reduction="none")
    _finite(r)
    # float64: 1e-10, the log-sum-exp tolerance (LSE - x_y loses ulps of 1e4 when the
    # two are formed separately: log 3 in rows of +-1e4 logits).
    rtol = 1e-6 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(r.loss, want, rtol=rtol, atol=0)
    np.testing.assert_allclose(r.gradient, want_grad, rtol=rtol, atol=1e-15)
    mean = compute("sparse_categorical_cross_entropy", x, labels, from_logits=True)
    assert mean.loss == pytest.approx((3 * BIG + 2 * math.log(3.0)) / 5, rel=1e-12)


@pytest.mark.parametrize("x0", (10.0, 20.0, 30.0))
def test_confident_logits_absolute_accuracy(x0):
    # Tiny losses of confidently right logits: log1p(e^-x0). Stable formulas keep the
    # absolute error at a few ulp of the logits (not relative accuracy: PyTorch has none
    # there either). Records the size of the error, not a PyTorch difference.
    exact = math.log1p(math.exp(-x0))
    ulp = math.ulp(x0)
    ce = compute("sparse_categorical_cross_entropy", np.array([[x0, 0.0]]), np.array([0]),
                 from_logits=True)
    bce = compute("sigmoid_cross_entropy", np.array([-x0]), np.array([0.0]))
    assert abs(ce.loss - exact) <= 4 * ulp
    assert abs(bce.loss - exact) <= 4 * ulp
    # Gradients sigmoid(-x0) (both are sigma of the wrong class) to full relative precision.
    s = math.exp(-x0) / (1.0 + math.exp(-x0))
    assert ce.gradient[0, 1] == pytest.approx(s, rel=1e-12)
    assert bce.gradient[0] == pytest.approx(s, rel=1e-12)


# ---------------------------------------------------------------- clamps (section 1.4)

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bce_probabilities_zero_and_one(dtype):
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.25], dtype=dtype)
    r = compute("binary_cross_entropy", p, y, reduction="none")
    # Each log floored at -100 (PyTorch BCELoss): 100, 100, 0, 0, 0.25 * 100.
    np.testing.assert_array_equal(r.loss, np.array([100.0, 100.0, 0.0, 0.0, 25.0], dtype))
    # Gradient of the clamped expression (spec): a floored log contributes 0; the live
    # term gives (1 - y)/(1 - p) = 1 at p=0, y=0; -y/p = -1 at p=1, y=1; 0.75 at p=0, y=0.25.
    np.testing.assert_array_equal(r.gradient, np.array([0.0, 0.0, 1.0, -1.0, 0.75], dtype))
    mean = compute("binary_cross_entropy", p, y)
    assert mean.loss == pytest.approx(45.0, rel=1e-15)
    np.testing.assert_allclose(mean.gradient, [0.0, 0.0, 0.2, -0.2, 0.15], rtol=1e-7)


def test_bce_probabilities_just_above_the_floor():
    # log(1e-50) = -115.1 is floored: loss 100, gradient 0; log(1e-40) = -92.1 is not.
    p = np.array([1e-50, 1e-40])
    r = compute("binary_cross_entropy", p, np.ones(2), reduction="none")
    np.testing.assert_allclose(r.loss, [100.0, -math.log(1e-40)], rtol=1e-15)
    np.testing.assert_allclose(r.gradient, [0.0, -1e40], rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_categorical_probabilities_with_zeros(dtype):
    # -sum q_k max(log p_k, -100): a zero p with q > 0 costs 100 q and has gradient 0.
    p = np.array([[0.0, 0.5, 0.5], [0.25, 0.75, 0.0]], dtype=dtype)
    q = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=dtype)
    r = compute("categorical_cross_entropy", p, q, reduction="none")
    np.testing.assert_allclose(r.loss, [50.0 - 0.5 * math.log(0.5), -math.log(0.75)],
                               rtol=1e-7 if dtype == np.float32 else 1e-15)
    np.testing.assert_allclose(r.gradient, [[0.0, -1.0, 0.0], [0.0, -4.0 / 3.0, 0.0]],
                               rtol=1e-7 if dtype == np.float32 else 1e-15)
    s = compute("sparse_categorical_cross_entropy", p, np.array([0, 2]), reduction="none")
    np.testing.assert_array_equal(s.loss, np.array([100.0, 100.0], dtype))
    np.testing.assert_array_equal(s.gradient, np.zeros((2, 3), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_kl_target_zeros(dtype):
    tol = 1e-7 if dtype == np.float32 else 1e-15
    q = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.5], [0.0, 1.0, 0.0]], dtype=dtype)
    p = np.array([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=dtype)
    r = compute("kl_divergence", q, p, reduction="none")
    # Row 0: p_0 = 0 contributes 0 -> 0.5 log(0.5/0.3) + 0.5 log(1).
    # Row 1: zeros in p where q is 0 or not: 1 log(1/1) = 0.
    # Row 2: q_0 = 0 under p_0 = 0.5: log q floored at -100 -> 0.5 (log 0.5 + 100) + 0.5 log 0.5
    want = [0.5 * math.log(0.5 / 0.3), 0.0, 50.0 + math.log(0.5)]
    np.testing.assert_allclose(r.loss, want, rtol=tol, atol=0)
    # -p/q where p > 0 and the floor is not active, else 0.
    np.testing.assert_allclose(
        r.gradient, [[0.0, -0.5 / 0.3, -1.0], [0.0, -1.0, 0.0], [0.0, -0.5, 0.0]], rtol=tol)
    lg = compute("kl_divergence", np.log(np.array([[0.2, 0.3, 0.5]])).astype(dtype),
                 p[:1], reduction="none", log_predictions=True)
    np.testing.assert_allclose(lg.loss, want[:1], rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_array_equal(lg.gradient, np.array([[0.0, -0.5, -0.5]], dtype))


@pytest.mark.parametrize(("loss", "p", "t"), [
    ("binary_cross_entropy", [1e-40, 0.5], [1.0, 0.0]),
    ("categorical_cross_entropy", [[1e-40, 1.0]], [[0.5, 0.5]]),
    ("sparse_categorical_cross_entropy", [[1e-40, 1.0]], [0]),
    ("kl_divergence", [[1e-40, 1.0]], [[0.5, 0.5]]),
], ids=("bce", "cce", "sparse", "kl"))
def test_float32_tiny_probability_gradient_is_finite(loss, p, t):
    # 1e-40 is a valid float32 probability (subnormal) above the floor e^-100 = 3.7e-44,
    # so the log is live and the exact derivative -q/p ~ -1e40 exceeds float32's range.
    # Degenerate inputs must stay finite (STYLE, Tests); PyTorch's BCELoss bounds the
    # same gradient with max(p (1 - p), 1e-12).
    t = np.asarray(t) if loss == "sparse_categorical_cross_entropy" else np.float32(t)
    r = compute(loss, np.asarray(p, dtype=np.float32), t, reduction="sum")
    assert math.isfinite(r.loss)
    assert np.all(np.isfinite(r.gradient)), r.gradient
    assert r.gradient.ravel()[0] < 0.0


@pytest.mark.parametrize(("loss", "p", "t", "params", "want"), [
    ("binary_cross_entropy", [1e-40, 0.5], [0.0, 0.0], {}, [1.0, 2.0]),
    ("categorical_cross_entropy", [[1e-40, 1.0]], [[0.0, 1.0]], {}, [[0.0, -1.0]]),
    ("sparse_categorical_cross_entropy", [[1e-40, 1.0]], [1],
     {"label_smoothing": 0.2, "class_weight": [0.0, 1.0]}, [[0.0, -0.9]]),  # -(0.8 + 0.2 / 2)
], ids=("bce", "cce", "sparse"))
def test_float32_tiny_probability_with_zero_weight_has_zero_gradient(loss, p, t, params, want):
    # A term weighted 0 (target 0, class weight 0) at a live log: 0 * (1/p), not
    # 0 * inf = NaN, although 1/p overflows float32.
    t = np.asarray(t) if loss == "sparse_categorical_cross_entropy" else np.float32(t)
    r = compute(loss, np.asarray(p, dtype=np.float32), t, reduction="sum", **params)
    np.testing.assert_allclose(r.gradient, np.asarray(want, np.float32), rtol=1e-6)


# ---------------------------------------------------------------- nothing counts

def test_sparse_all_ignored():
    x = _rng("all-ignored").normal(size=(4, 3))
    y = np.full(4, -100)
    for reduction in ("mean", "sum"):
        r = compute("sparse_categorical_cross_entropy", x, y, from_logits=True,
                    ignore_index=-100, reduction=reduction, label_smoothing=0.1)
        assert r.loss == 0.0
        np.testing.assert_array_equal(r.gradient, np.zeros_like(x))
        assert (r.positions, r.positions_counted, r.weight_sum) == (4, 0, 0.0)
    r = compute("sparse_categorical_cross_entropy", x, y, from_logits=True, ignore_index=-100,
                reduction="none")
    np.testing.assert_array_equal(r.loss, np.zeros(4))


ALL_LOSSES = [
    ("mae", "values", {}), ("mse", "values", {}), ("rmse", "values", {}),
    ("huber", "values", {}), ("pseudo_huber", "values", {}),
    ("hinge", "signed", {}), ("squared_hinge", "signed", {}),
    ("binary_cross_entropy", "probabilities", {}), ("sigmoid_cross_entropy", "logits", {}),
    ("categorical_cross_entropy", "rows", {}),
    ("categorical_cross_entropy", "logit_rows", {"from_logits": True}),
    ("sparse_categorical_cross_entropy", "label_probabilities", {}),
    ("sparse_categorical_cross_entropy", "labels", {"from_logits": True}),
    ("kl_divergence", "rows", {}),
]


def _inputs(kind: str, rng: np.random.Generator, shape=(4, 3)):
    if kind == "values":
        return rng.normal(size=shape), rng.normal(size=shape)
    if kind == "signed":
        return rng.normal(size=shape), rng.choice([-1.0, 1.0], size=shape)
    if kind == "probabilities":
        return rng.uniform(0.1, 0.9, size=shape), rng.random(size=shape)
    if kind == "logits":
        return rng.normal(0.0, 3.0, size=shape), rng.random(size=shape)
    if kind == "rows":
        u, v = rng.uniform(0.1, 1.0, size=(2,) + shape)
        return u / u.sum(-1, keepdims=True), v / v.sum(-1, keepdims=True)
    if kind == "log_rows":
        u, v = rng.uniform(0.1, 1.0, size=(2,) + shape)
        return np.log(u / u.sum(-1, keepdims=True)), v / v.sum(-1, keepdims=True)
    if kind == "logit_rows":
        v = rng.random(size=shape)
        return rng.normal(0.0, 2.0, size=shape), v / v.sum(-1, keepdims=True)
    if kind == "label_probabilities":
        u = rng.uniform(0.1, 1.0, size=shape)
        return u / u.sum(-1, keepdims=True), rng.integers(0, shape[-1], size=shape[:-1])
    assert kind == "labels", kind
    return rng.normal(size=shape), rng.integers(0, shape[-1], size=shape[:-1])


@pytest.mark.parametrize(("loss", "kind", "params"), ALL_LOSSES,
                         ids=[f"{a}-{b}" for a, b, _ in ALL_LOSSES])
def test_all_zero_sample_weights(loss, kind, params):
    x, t = _inputs(kind, _rng("zero-weights", loss, kind))
    for reduction in ("mean", "sum"):
        r = compute(loss, x, t, sample_weight=np.zeros(4), reduction=reduction, **params)
        assert r.loss == 0.0
        np.testing.assert_array_equal(r.gradient, np.zeros_like(x))
        assert (r.positions_counted, r.weight_sum) == (0, 0.0)
    none = compute(loss, x, t, sample_weight=np.zeros(4), reduction="none", **params)
    np.testing.assert_array_equal(none.loss, np.zeros(ref.position_shape(loss, x.shape)))
    np.testing.assert_array_equal(none.gradient, np.zeros_like(x))


# ---------------------------------------------------------------- kinks (section 1.5)

@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_rmse_at_zero_error(reduction):
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    r = compute("rmse", x, x.copy(), reduction=reduction)
    np.testing.assert_array_equal(r.loss, np.zeros((2, 2)) if reduction == "none" else 0.0)
    np.testing.assert_array_equal(r.gradient, np.zeros_like(x))


def test_rmse_none_zero_error_positions():
    # Per position sqrt(w r^2) = sqrt(w) |r|: gradient sqrt(w) sign(r), 0 where r = 0.
    r = compute("rmse", np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 5.0]),
                sample_weight=np.array([4.0, 4.0, 9.0]), reduction="none")
    np.testing.assert_array_equal(r.loss, [0.0, 4.0, 6.0])
    np.testing.assert_array_equal(r.gradient, [0.0, 2.0, -3.0])


def test_mae_gradient_zero_at_zero_residual():
    r = compute("mae", np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.5]), reduction="sum")
    np.testing.assert_array_equal(r.gradient, [0.0, 1.0, -1.0])  # sign(r), sign(0) = 0
    assert r.loss == 2.5


def test_hinge_gradient_zero_at_margin():
    p = np.array([1.0, -1.0, 0.5, -0.25])
    y = np.array([1.0, -1.0, 1.0, -1.0])  # y p = [1, 1, 0.5, 0.25]
    r = compute("hinge", p, y, reduction="sum")
    np.testing.assert_array_equal(r.gradient, [0.0, 0.0, -1.0, 1.0])
    assert r.loss == 1.25
    s = compute("squared_hinge", p, y, reduction="none")
    np.testing.assert_array_equal(s.loss, [0.0, 0.0, 0.25, 0.5625])
    np.testing.assert_array_equal(s.gradient, [0.0, 0.0, -1.0, 1.5])  # -2 y max(0, 1 - y p)


def test_huber_at_delta_is_continuous():
    # |r| = delta: value delta^2 / 2 from either branch, gradient clip(r, -delta, delta).
    r = compute("huber", np.array([2.0, -2.0]), np.array([0.0, 0.0]), delta=2.0,
                reduction="none")
    np.testing.assert_array_equal(r.loss, [2.0, 2.0])
    np.testing.assert_array_equal(r.gradient, [2.0, -2.0])


# ---------------------------------------------------------------- options

@pytest.mark.parametrize(("loss", "kind", "params"), ALL_LOSSES,
                         ids=[f"{a}-{b}" for a, b, _ in ALL_LOSSES])
def test_gradient_false(loss, kind, params):
    x, t = _inputs(kind, _rng("no-gradient", loss, kind))
    for reduction in ("none", "sum", "mean"):
        a = compute(loss, x, t, reduction=reduction, gradient=False, **params)
        b = compute(loss, x, t, reduction=reduction, **params)
        assert a.gradient is None
        np.testing.assert_array_equal(a.loss, b.loss)
        assert (a.positions, a.positions_counted, a.weight_sum) == (
            b.positions, b.positions_counted, b.weight_sum)


# ---------------------------------------------------------------- accumulation

LARGE = 100_000


@pytest.mark.parametrize(("loss", "kind", "params"), [
    ("mse", "values", {}),
    ("mae", "values", {}),
    ("rmse", "values", {}),
    ("sigmoid_cross_entropy", "logits", {}),
    ("binary_cross_entropy", "probabilities", {"label_smoothing": 0.1}),
    ("categorical_cross_entropy", "logit_rows", {"from_logits": True}),
    ("sparse_categorical_cross_entropy", "labels", {"from_logits": True}),
    ("kl_divergence", "rows", {}),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_float32_accumulates_in_float64(loss, kind, params, reduction):
    # Sums of 1e5 float32 terms are off by far more than 1e-6 when accumulated in float32;
    # the spec promises 1e-6 relative of the float64 reference on the same (upcast) inputs.
    rng = _rng("float32-large", loss, kind)
    shape = (LARGE,) if not ref.is_class_loss(loss) else (LARGE // 4, 4)
    x, t = _inputs(kind, rng, shape)
    x = x.astype(np.float32)
    t = t.astype(np.float32) if t.dtype.kind == "f" else t
    w = rng.uniform(0.0, 2.0, size=shape[0]).astype(np.float32)
    r = compute(loss, x, t, reduction=reduction, sample_weight=w, gradient=False, **params)
    exp = ref.expected(loss, x, t, reduction=reduction, sample_weight=w, **params)
    assert r.loss == pytest.approx(exp.loss, rel=1e-6)
    assert r.weight_sum == pytest.approx(exp.weight_sum, rel=1e-12)


SPLIT_LOSSES = [c for c in ALL_LOSSES if c[0] != "rmse"]  # rmse NONE is sqrt(w r^2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("loss", "kind", "params"), SPLIT_LOSSES,
                         ids=[f"{a}-{b}" for a, b, _ in SPLIT_LOSSES])
def test_none_values_sum_to_sum(loss, kind, params, dtype):
    rng = _rng("none-vs-sum", loss, kind)
    x, t = _inputs(kind, rng, (64, 5))
    x = x.astype(dtype)
    t = t.astype(dtype) if t.dtype.kind == "f" else t
    w = rng.uniform(0.0, 2.0, size=64).astype(dtype)
    none = compute(loss, x, t, reduction="none", sample_weight=w, **params)
    total = compute(loss, x, t, reduction="sum", sample_weight=w, **params)
    # float32 NONE values are each rounded to float32: half an ulp each.
    rtol = 1e-13 if dtype == np.float64 else 1e-7
    assert math.fsum(none.loss.astype(np.float64).ravel()) == pytest.approx(total.loss, rel=rtol)
    # Both gradients are of the plain sum of w_i l_i.
    np.testing.assert_allclose(none.gradient, total.gradient, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- reproducibility

@pytest.mark.parametrize(("loss", "kind", "params"), [
    ("mse", "values", {}),
    ("huber", "values", {"delta": 0.5}),
    ("rmse", "values", {}),
    ("sigmoid_cross_entropy", "logits", {"pos_weight": 2.0}),
    ("categorical_cross_entropy", "logit_rows", {"from_logits": True, "label_smoothing": 0.1}),
    ("sparse_categorical_cross_entropy", "labels", {"from_logits": True, "label_smoothing": 0.1}),
    ("kl_divergence", "rows", {}),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bit_identical_repeats(loss, kind, params, dtype):
    rng = _rng("repeat", loss)
    shape = (300_000,) if not ref.is_class_loss(loss) else (60_000, 5)
    x, t = _inputs(kind, rng, shape)
    x = x.astype(dtype)
    t = t.astype(dtype) if t.dtype.kind == "f" else t
    w = rng.uniform(0.0, 2.0, size=shape[0]).astype(dtype)
    a = compute(loss, x, t, sample_weight=w, **params)
    b = compute(loss, x, t, sample_weight=w, **params)
    assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    assert a.gradient.tobytes() == b.gradient.tobytes()
    # The SUM gradient of each position does not depend on the batch it is in: the first
    # 1000 positions alone give the same bits (a size-routed parallel path must agree).
    head = compute(loss, x[:1000], t[:1000], sample_weight=w[:1000], reduction="sum",
                   **params)
    full = compute(loss, x, t, sample_weight=w, reduction="sum", **params)
    if loss != "rmse":  # rmse's gradient is scaled by the batch's RMSE
        assert head.gradient.tobytes() == full.gradient[:1000].tobytes()


def test_drivers_split_into_tasks_give_the_bits_of_one_thread():
    """More blocks than parallel tasks, split unevenly (drivers.TASKS): each task runs a run
    of blocks on one set of scratch, and every block sum is added in block order, so the
    parallel path gives the serial path's bits, with and without the gradient."""
    compile_kernels()  # the declared signatures, as the engine runs them
    rng = _rng("tasks")
    n = 2 * drivers.TASKS * BLOCK + 123
    x, y = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    c = 10
    rows = (drivers.TASKS * 2 + 23) * (BLOCK // c) + 7
    logits = rng.normal(size=(rows, c)).astype(np.float32)
    labels = rng.integers(0, c, rows)
    labels[::13] = -100  # ignored rows
    probs = rng.dirichlet(np.ones(c), size=rows).astype(np.float32)
    none, f8 = np.empty(0, np.float32), np.empty(0)
    for want_grad in (True, False):
        runs = []
        for parallel in (False, True):
            out = np.empty(n, np.float32)
            grad = np.empty(n if want_grad else 0, np.float32)
            huber = drivers.elementwise(x, y, f8, out, grad, 1.0, drivers.HUBER, 0.5, 0.0,
                                        True, parallel, 0.0)
            rgrad = np.empty((rows if want_grad else 0, c), np.float32)
            sparse = row_drivers.sparse_rows(logits, labels, f8, f8, none, rgrad, 1.0, -100,
                                             0.1, SPARSE_LOGITS, True, want_grad, parallel,
                                             0.0)
            dgrad = np.empty((rows if want_grad else 0, c), np.float32)
            dense = row_drivers.dense_rows(logits, probs, f8, none, dgrad, 1.0,
                                           row_drivers.CCE_LOGITS, 0.0, True, want_grad,
                                           parallel, 0.0)
            runs.append((huber, out.tobytes(), grad.tobytes(), sparse, rgrad.tobytes(), dense,
                         dgrad.tobytes()))
        assert runs[0] == runs[1]
    r = x.astype(np.float64) - y
    want = np.where(np.abs(r) < 0.5, 0.5 * r * r, 0.5 * (np.abs(r) - 0.25)).sum()
    assert runs[0][0] == pytest.approx(want, rel=1e-6)
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert runs[0][5] == pytest.approx((probs * (lse[:, None] - z)).sum(), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", ["MSE", "MAE", "HUBER", "BCE_LOGITS"])
def test_element_sums_do_not_depend_on_where_the_gradient_lies(op, dtype):
    """The same inputs give the same bits wherever the gradient's memory lies: just after
    the predictions or the targets (where LLVM's run-time check of a loop that stores
    picks the loop's scalar version) or anywhere else; serial and parallel, sizes below
    one vector's worth to several blocks."""
    compile_kernels()
    rng = _rng("where", op)
    empty, f8 = np.empty(0, dtype), np.empty(0)
    for n in (15, 100, 5000, 70_000):
        x, y = rng.normal(size=n).astype(dtype), (rng.random(n) > 0.5).astype(dtype)
        sums, grads = set(), set()
        for gap in (0, 1, 3, 8, 64, None):
            for after in ("x", "y"):
                buf = np.empty(2 * n + (gap or 0), dtype)
                first, grad = buf[:n], buf[n + (gap or 0):]
                if gap is None:
                    first, grad = np.empty(n, dtype), np.empty(n, dtype)
                first[:] = x if after == "x" else y
                xs, ys = (first, y) if after == "x" else (x, first)
                for parallel in (False, True):
                    sums.add(drivers.elementwise(xs, ys, f8, empty, grad, 1.0,
                                                 getattr(drivers, op), 1.0, 0.0, True,
                                                 parallel, 0.0))
                    grads.add(grad.tobytes())
        assert len(sums) == 1 and len(grads) == 1, (n, sums)
        if op == "MSE":
            want = ((x.astype(np.float64) - y) ** 2).sum()
            assert sums.pop() == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13)

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_huber_gives_the_same_bits_on_its_lean_and_its_block_loop(dtype):
    """From LEAN_HUBER_MIN elements Huber sums its losses in a loop of their own: a batch
    that size must give the bits of the same batch in two calls below it (the second
    continuing from the first's total, cut at a block boundary), sum and gradient, serial
    and parallel; with the weights or per-position outputs that keep the block loop too."""
    compile_kernels()
    rng = _rng("lean-huber")
    n = drivers.LEAN_HUBER_MIN + 3 * BLOCK + 17
    cut = (n // 2) // BLOCK * BLOCK
    assert n - cut < drivers.LEAN_HUBER_MIN
    x = rng.normal(size=n).astype(dtype)
    y = (x - rng.choice([-1.0, 1.0], n) * rng.uniform(0.05, 3.0, n)).astype(dtype)
    empty, f8 = np.empty(0, dtype), np.empty(0)
    for parallel in (False, True):
        whole = np.empty(n, dtype)
        total = drivers.elementwise(x, y, f8, empty, whole, 0.5, drivers.HUBER, 1.0, 0.0, True,
                                    parallel, 0.0)
        parts = np.empty(n, dtype)
        first = drivers.elementwise(x[:cut], y[:cut], f8, empty, parts[:cut], 0.5,
                                    drivers.HUBER, 1.0, 0.0, True, parallel, 0.0)
        second = drivers.elementwise(x[cut:], y[cut:], f8, empty, parts[cut:], 0.5,
                                     drivers.HUBER, 1.0, 0.0, True, parallel, first)
        assert total == second
        assert whole.tobytes() == parts.tobytes()
    r = x.astype(np.float64) - y
    want = np.where(np.abs(r) < 1.0, 0.5 * r * r, np.abs(r) - 0.5).sum()
    assert total == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("weighted", [False, True])
def test_mse_gradient_op_writes_mse_gradient_bits(weighted):
    """RMSE's second pass (MSE_GRADIENT) writes the MSE gradient's bits; unweighted it
    leaves the sum out and returns 0, weighted it runs the block loop."""
    compile_kernels()
    rng = _rng("mse-gradient", weighted)
    n = 70_000
    x, y = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    w = rng.uniform(0.5, 2.0, n) if weighted else np.empty(0)
    empty = np.empty(0, np.float32)
    for parallel in (False, True):
        mse, only = np.empty(n, np.float32), np.empty(n, np.float32)
        total = drivers.elementwise(x, y, w, empty, mse, 0.25, drivers.MSE, 0.0, 0.0, True,
                                    parallel, 0.0)
        rest = drivers.elementwise(x, y, w, empty, only, 0.25, drivers.MSE_GRADIENT, 0.0, 0.0,
                                   True, parallel, 0.0)
        assert only.tobytes() == mse.tobytes()
        assert rest == (total if weighted else 0.0)
    np.testing.assert_allclose(mse, 0.25 * (w if weighted else 1.0) * 2.0 * (x - y),
                               rtol=1e-6)


@pytest.mark.parametrize("log_predictions", [False, True])
def test_kl_nan_target_propagates_when_allowed(log_predictions):
    """A NaN target must not be mistaken for p = 0 (which contributes exactly 0)."""
    q = np.array([[0.5, 0.5]])
    x = np.log(q) if log_predictions else q
    r = compute("kl_divergence", x, [[np.nan, 0.5]], allow_nonfinite=True,
                log_predictions=log_predictions, reduction="sum")
    assert math.isnan(r.loss)
    assert math.isnan(r.gradient[0, 0])
    assert r.gradient[0, 1] == (-0.5 if log_predictions else -1.0)  # -p or -p/q
