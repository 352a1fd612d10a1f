"""The extended catalog at its edges: kinks, clamps, extremes, special cases that equal
other losses, the reference's cross-check table, accumulation and reproducibility.

Expected numbers are worked out by hand from the formulas in the loss reference (the
section is named at each test), or come from its section 7 table.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import reference as ref
from lossgrad import compute

DTYPES = (np.float64, np.float32)
BIG = 1e4


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _finite(r) -> None:
    assert np.all(np.isfinite(r.loss))
    assert np.all(np.isfinite(r.gradient))


def _ulps(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got)
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want).astype(
        got.dtype)).astype(np.float64)))


# ---------------------------------------------------------------- regression (section 2)

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_smooth_l1_beta_zero_is_l1(dtype):
    x = np.array([-2.0, 0.0, 0.5, 3.0], dtype)
    y = np.array([1.0, 0.0, 0.25, 3.0], dtype)
    a = compute("smooth_l1", x, y, beta=0.0, reduction="none")
    b = compute("mae", x, y, reduction="none")
    assert a.loss.tobytes() == b.loss.tobytes()
    assert a.gradient.tobytes() == b.gradient.tobytes()  # sign(r), 0 at r = 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_smooth_l1_kernel_at_beta_one_is_the_huber_kernel(dtype):
    """The engine runs smooth L1 with beta = 1 on the Huber kernel (delta = 1): the two
    kernels must agree bit for bit there, the Hessian's too, at and around the kink."""
    from lossgrad.kernels import drivers, second_order

    rng = _rng("smooth-l1-huber", np.dtype(dtype).name)
    x = np.concatenate([rng.normal(0.0, 2.0, 70_000), [1.0, -1.0, 0.0]]).astype(dtype)
    y = np.concatenate([rng.normal(0.0, 2.0, 70_000), [0.0, 0.0, 0.0]]).astype(dtype)
    w, none = np.empty(0), np.empty(0, dtype)
    for parallel in (False, True):
        runs = []
        for op in (drivers.SMOOTH_L1, drivers.HUBER):
            g = np.empty_like(x)
            total = drivers.elementwise(x, y, w, none, g, 0.5, op, 1.0, 0.0, True, parallel,
                                        0.0)
            h, g2 = np.empty_like(x), np.empty_like(x)
            total2 = second_order.elementwise(x, y, w, none, g2, h, 0.5, op, 1.0, 0.0,
                                              np.array([-np.inf, np.inf]), True, parallel)
            runs.append((total, g.tobytes(), total2, g2.tobytes(), h.tobytes()))
        assert runs[0] == runs[1]
        assert np.isfinite(runs[0][0]) and runs[0][0] > 0.0


def test_smooth_l1_table_and_kink():
    # Section 7: r = 2.5, beta = 2 -> SmoothL1 1.5 (= Huber / beta); gradient sign(r) = 1.
    r = compute("smooth_l1", np.array([2.5]), np.array([0.0]), beta=2.0)
    assert (r.loss, r.gradient[0]) == (1.5, 1.0)
    # At |r| = beta both pieces give beta / 2 and slope 1 (section 2.4).
    k = compute("smooth_l1", np.array([-2.0, 2.0]), np.array([0.0, 0.0]), beta=2.0,
                reduction="none")
    np.testing.assert_array_equal(k.loss, [1.0, 1.0])
    np.testing.assert_array_equal(k.gradient, [-1.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_log_cosh_keeps_precision_near_zero_and_far_out(dtype):
    r = np.array([1e-30, 1e-9, 1e-4, 0.01, 0.1, 0.124, 0.126, 0.3, 0.49, 0.51, 1.0, 5.0, 30.0,
                  -0.2, -7.0], dtype)
    got = compute("log_cosh", r, np.zeros_like(r), reduction="none")
    r64 = r.astype(np.float64)
    want = np.log1p(2.0 * np.sinh(0.5 * r64) ** 2)  # exact form, no cancellation
    # The form |r| + log1p(e^-2|r|) - log 2 (Keras's) cancels for small |r|: at 1e-9 it is
    # noise. The Taylor series below the cut keeps every digit; just above it the closed
    # form loses a few bits (about 40 float64 ulps at |r| = 0.126).
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(got.loss, want.astype(dtype), rtol=rtol, atol=0)
    assert _ulps(got.gradient, np.tanh(r64)) <= 4
    far = compute("log_cosh", np.array([BIG, -BIG], dtype), np.zeros(2, dtype), reduction="none")
    _finite(far)
    np.testing.assert_allclose(far.loss, BIG - math.log(2.0), rtol=1e-7)
    np.testing.assert_array_equal(far.gradient, [1.0, -1.0])


def test_quantile_kink_and_table():
    # Section 7: sklearn mean_pinball_loss([1, 2, 3], [0, 2, 3], alpha=0.5) = 0.1667.
    r = compute("quantile", np.array([0.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), quantile=0.5)
    assert r.loss == pytest.approx(1.0 / 6.0, rel=1e-15)
    # Gradient -tau below the target, 0 at it (the kink), (1 - tau) / N above it.
    q = compute("pinball", np.array([0.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0]),
                quantile=0.9, reduction="sum")
    np.testing.assert_allclose(q.gradient, [-0.9, 0.0, 0.1], rtol=1e-15)
    assert q.loss == pytest.approx(0.9 + 0.1, rel=1e-15)


def test_mape_zero_target_uses_keras_epsilon():
    # |r| / max(|y|, 1e-7) * 100 (section 2.8): y = 0 -> 100 |r| / 1e-7.
    r = compute("mape", np.array([0.5, 2.0, 3.0]), np.array([0.0, -4.0, 3.0]),
                reduction="none")
    np.testing.assert_allclose(r.loss, [0.5e9, 150.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(r.gradient, [1e9, 25.0, 0.0], rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_msle_clamps_negative_inputs(dtype):
    # Both inputs clamped to >= 1e-7 first (Keras, section 2.9): a prediction below the
    # clamp gets gradient 0; a target below it counts as 1e-7.
    x = np.array([-3.0, 1e-9, 1.0], dtype)
    y = np.array([2.0, -1.0, -5.0], dtype)
    r = compute("msle", x, y, reduction="none")
    lp = np.log1p(1e-7)
    want = [(lp - math.log(3.0)) ** 2, 0.0, (math.log(2.0) - lp) ** 2]
    np.testing.assert_allclose(r.loss, want, rtol=1e-15 if dtype == np.float64 else 1e-7,
                               atol=1e-30)
    assert r.gradient[0] == 0.0 and r.gradient[1] == 0.0
    assert r.gradient[2] == pytest.approx(2.0 * (math.log(2.0) - lp) / 2.0, rel=1e-7)


def test_poisson_extremes():
    # Log input: e^x overflows past log(largest float), as in PyTorch (value +inf).
    big = compute("poisson_nll", np.array([800.0, 0.0]), np.array([1.0, 3.0]), reduction="none")
    assert big.loss[0] == math.inf and big.loss[1] == 1.0
    # Rate input at 0: -y log(1e-8) (PyTorch's eps); gradient 1 - y / 1e-8.
    zero = compute("poisson_nll", np.array([0.0, 0.0]), np.array([0.0, 2.0]), log_input=False,
                   reduction="none")
    np.testing.assert_allclose(zero.loss, [0.0, -2.0 * math.log(1e-8)], rtol=1e-15)
    np.testing.assert_allclose(zero.gradient, [1.0, 1.0 - 2e8], rtol=1e-15)
    # full: Stirling's term only where y > 1 (y = 1 adds nothing).
    full = compute("poisson_nll", np.array([0.0, 0.0]), np.array([1.0, 5.0]), full=True,
                   reduction="none")
    stirling = 5 * math.log(5) - 5 + 0.5 * math.log(2 * math.pi * 5)
    np.testing.assert_allclose(full.loss, [1.0, 1.0 + stirling], rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tweedie_special_powers(dtype):
    rng = _rng("tweedie-powers")
    mu = rng.uniform(0.5, 3.0, size=6).astype(dtype)
    y = rng.uniform(-1.0, 3.0, size=6).astype(dtype)
    # power 0 is the squared error (sklearn mean_tweedie_deviance(power=0)), bit for bit.
    a = compute("tweedie", mu, y, power=0.0, reduction="none")
    b = compute("mse", mu, y, reduction="none")
    assert a.loss.tobytes() == b.loss.tobytes() and a.gradient.tobytes() == b.gradient.tobytes()
    # A zero target: 2 mu (power 1); 2 mu^(2-p) / (2-p) (1 < p < 2): y x^(1-p) terms vanish.
    m = np.array([0.5, 2.0], dtype)
    p1 = compute("tweedie", m, np.zeros(2, dtype), power=1.0, reduction="none")
    np.testing.assert_allclose(p1.loss, [1.0, 4.0], rtol=1e-7)
    p15 = compute("tweedie", m, np.zeros(2, dtype), power=1.5, reduction="none")
    np.testing.assert_allclose(p15.loss, 4.0 * np.sqrt(m.astype(np.float64)), rtol=1e-7)
    # Gradient 2 mu^-p (mu - y) for every power (section 2.12).
    g = compute("tweedie", m, np.ones(2, dtype), power=3.0, reduction="sum")
    np.testing.assert_allclose(g.gradient, 2.0 * m.astype(np.float64) ** -3 * (m - 1.0),
                               rtol=1e-6)


@pytest.mark.parametrize("power", (1.5, 3.0, -0.5))
def test_tweedie_gradient_keeps_precision_near_its_minimum(power):
    """The gradient 2 mu^-p (mu - y) is formed from mu - y: with y within 1e-6 relative of
    mu, computing it as 2 (mu^(1-p) - y mu^(1-p) / mu) would keep about 7 digits; against
    an 80-bit long double reference it must keep float64's."""
    rng = _rng("tweedie-near", power)
    mu = rng.uniform(0.5, 3.0, size=2000)
    y = mu * (1.0 + rng.uniform(-1e-6, 1e-6, size=2000))
    g = compute("tweedie", mu, y, power=power, reduction="sum").gradient
    ml, yl = mu.astype(np.longdouble), y.astype(np.longdouble)
    want = 2 * ml ** -np.longdouble(power) * (ml - yl)
    assert float(np.max(np.abs((g - want) / want))) < 1e-13


def test_tweedie_three_halves_loss_keeps_precision_near_its_minimum():
    """At power 1.5 the deviance is 4 (sqrt(mu) - sqrt(y))^2 / sqrt(mu): near y = mu the
    expanded three-term form cancels to a few digits, the kernel's must keep float64's
    (against an 80-bit long double reference); y = 0 gives 4 sqrt(mu)."""
    rng = _rng("tweedie-three-halves")
    mu = rng.uniform(0.5, 3.0, size=2000)
    y = mu * (1.0 + rng.uniform(-1e-6, 1e-6, size=2000))
    y[:3] = 0.0
    got = compute("tweedie", mu, y, power=1.5, reduction="none").loss
    ml, yl = mu.astype(np.longdouble), y.astype(np.longdouble)
    want = 4 * ((ml - yl) / (np.sqrt(ml) + np.sqrt(yl))) ** 2 / np.sqrt(ml)  # mu - y exact
    assert float(np.max(np.abs((got - want) / want))) < 1e-13
    # The general kernel (any other power) keeps only the digits the cancellation leaves.
    near = compute("tweedie", mu, y, power=1.5 + 1e-12, reduction="none").loss
    assert float(np.max(np.abs((near - want) / want))) > 1e-9


def test_gaussian_variance_clamp():
    # v = max(var, 1e-6): var = 0 is allowed; both gradients at the clamped v (PyTorch).
    eps = 1e-6
    r = compute("gaussian_nll", np.array([1e-3, 0.5]), np.array([0.0, 0.5]),
                variance=np.array([0.0, 2.0]), reduction="none")
    want = [0.5 * (math.log(eps) + 1e-6 / eps), 0.5 * math.log(2.0)]
    np.testing.assert_allclose(r.loss, want, rtol=1e-13)
    np.testing.assert_allclose(r.gradient, [1e-3 / eps, 0.0], rtol=1e-13)
    np.testing.assert_allclose(r.variance_gradient, [0.5 * (1 / eps - 1e-6 / eps**2), 0.25],
                               rtol=1e-10, atol=1e-6)


# ---------------------------------------------------------------- focal (section 4.8)

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sigmoid_focal_without_focus_is_bce_with_logits(dtype):
    rng = _rng("focal-bce")
    x = rng.normal(0.0, 4.0, size=(4, 5)).astype(dtype)
    y = rng.random(size=(4, 5)).astype(dtype)
    a = compute("sigmoid_focal", x, y, alpha=-1.0, gamma=0.0, reduction="none")
    b = compute("sigmoid_cross_entropy", x, y, reduction="none")
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(a.loss, b.loss, rtol=rtol)
    np.testing.assert_allclose(a.gradient, b.gradient, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("gamma", (2.0, 0.5))
def test_sigmoid_focal_extreme_logits(gamma, dtype):
    x = np.array([BIG, -BIG, BIG, -BIG], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0], dtype)
    r = compute("sigmoid_focal", x, y, gamma=gamma, reduction="none")
    _finite(r)
    # Right and sure: loss and gradient 0. Wrong and sure: (1 - p_t) = 1, so alpha_t BCE
    # = alpha_t 1e4, and slope alpha_t (sigmoid(x) - y) = +-alpha_t.
    np.testing.assert_array_equal(r.loss, np.array([0.0, 0.0, 0.75 * BIG, 0.25 * BIG], dtype))
    np.testing.assert_array_equal(r.gradient, np.array([0.0, 0.0, 0.75, -0.25], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_softmax_focal_without_focus_is_cross_entropy(dtype):
    rng = _rng("softmax-focal-ce")
    x = rng.normal(0.0, 3.0, size=(6, 4)).astype(dtype)
    q = rng.random(size=(6, 4))
    q = (q / q.sum(-1, keepdims=True)).astype(dtype)
    a = compute("softmax_focal", x, q, alpha=1.0, gamma=0.0)
    b = compute("categorical_cross_entropy", x, q, from_logits=True)
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    assert a.loss == pytest.approx(b.loss, rel=rtol)
    np.testing.assert_allclose(a.gradient, b.gradient, rtol=rtol * 10, atol=rtol * 1e-2)
    # alpha only scales (Keras: always applied).
    c = compute("softmax_focal", x, q, alpha=0.25, gamma=0.0)
    assert c.loss == pytest.approx(0.25 * a.loss, rel=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("gamma", (2.0, 0.5))
def test_softmax_focal_extreme_logits(gamma, dtype):
    x = np.array([[BIG, -BIG, 0.0], [BIG, -BIG, 0.0], [BIG, BIG, BIG], [-BIG, -BIG, -BIG]],
                 dtype)
    q = np.eye(3, dtype=dtype)[[0, 2, 1, 0]]
    r = compute("softmax_focal", x, q, alpha=1.0, gamma=gamma, reduction="none")
    _finite(r)
    third = (2.0 / 3.0) ** gamma * math.log(3.0)  # (1 - 1/3)^gamma (-log 1/3)
    want = [0.0, BIG, third, third]  # a sure wrong row: (1 - 0)^gamma (LSE - x_y) = 1e4
    np.testing.assert_allclose(r.loss, want, rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_array_equal(r.gradient[0], [0.0, 0.0, 0.0])


# ---------------------------------------------------------------- classes and margins

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nll_of_log_softmax_is_cross_entropy(dtype):
    rng = _rng("nll-ce")
    x = rng.normal(0.0, 2.0, size=(5, 4))
    y = rng.integers(0, 4, size=5)
    lp = ref.log_softmax(x).astype(dtype)
    a = compute("nll", lp, y, label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5, 1.0])
    b = compute("sparse_categorical_cross_entropy", x.astype(dtype), y, from_logits=True,
                label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5, 1.0])
    assert a.loss == pytest.approx(b.loss, rel=1e-12 if dtype == np.float64 else 1e-6)
    # Its gradient is of the NLL itself: -(1 - eps) w_y at the label, -(eps / C) w_c.
    g = compute("nll", lp[:1], y[:1], label_smoothing=0.2, reduction="sum")
    want = np.full(4, -0.05)
    want[y[0]] -= 0.8
    np.testing.assert_allclose(g.gradient[0], want, rtol=1e-7)


def test_nll_all_ignored_is_zero():
    # Every target ignored: loss 0, gradient 0 (the service's convention; PyTorch: NaN).
    r = compute("nll", np.log(np.full((2, 3), 1 / 3)), np.array([-100, -100]),
                ignore_index=-100)
    assert (r.loss, r.positions_counted, r.weight_sum) == (0.0, 0, 0.0)
    assert not np.any(r.gradient)


def test_hinges_table_and_ties():
    # Section 7: y = [1, 0, 0], s = [0.5, -2, -3]: Keras categorical hinge 0.5 (the true
    # class puts a 0 into the max), Crammer-Singer 0.
    s = np.array([[0.5, -2.0, -3.0]])
    keras = compute("categorical_hinge", s, np.array([[1.0, 0.0, 0.0]]))
    assert keras.loss == 0.5
    np.testing.assert_array_equal(keras.gradient, [[-1.0, 0.0, 0.0]])  # -y; max is slot 0
    cs = compute("multiclass_hinge", s, np.array([0]))
    assert cs.loss == 0.0 and not np.any(cs.gradient)
    # Exactly at the margin (1 + 0 - 1 = 0): gradient 0; tied maxima: the first one gets +1.
    at = compute("multiclass_hinge", np.array([[1.0, 0.0, 0.0]]), np.array([0]))
    assert at.loss == 0.0 and not np.any(at.gradient)
    tie = compute("multiclass_hinge", np.array([[0.0, 2.0, 2.0]]), np.array([0]),
                  class_weight=[3.0, 1.0, 1.0], reduction="sum")
    assert tie.loss == 9.0  # w_y (1 + 2 - 0)
    np.testing.assert_array_equal(tie.gradient, [[-3.0, 3.0, 0.0]])


def test_cosine_similarity_zero_vectors():
    # Norms floored at 1e-7 (Keras normalize): a zero vector gives 0. A zero prediction's
    # gradient is -t / (||t|| 1e-7) (the floor is constant); a zero target's is 0.
    x = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    t = np.array([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    r = compute("cosine_similarity", x, t, reduction="none")
    np.testing.assert_array_equal(r.loss, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(r.gradient[0], [-0.6e7, -0.8e7], rtol=1e-12)
    np.testing.assert_array_equal(r.gradient[1:], [[0.0, 0.0], [0.0, 0.0]])


# ---------------------------------------------------------------- accumulation, reproducibility

def _inputs(loss: str, rng, shape):
    if loss in ("nll", "multiclass_hinge"):
        x = rng.normal(size=shape)
        return (ref.log_softmax(x) if loss == "nll" else x), rng.integers(0, shape[-1],
                                                                          size=shape[:-1])
    if loss in ("softmax_focal",):
        q = rng.random(size=shape)
        return rng.normal(size=shape), q / q.sum(-1, keepdims=True)
    if loss in ("categorical_hinge", "cosine_similarity"):
        return rng.normal(size=shape), np.eye(shape[-1])[rng.integers(0, shape[-1],
                                                                      size=shape[:-1])]
    if loss in ("tweedie", "msle"):
        return rng.uniform(0.1, 3.0, size=shape), rng.uniform(0.0, 3.0, size=shape)
    if loss == "sigmoid_focal":
        return rng.normal(0.0, 3.0, size=shape), rng.random(size=shape)
    return rng.normal(size=shape), rng.normal(size=shape)


REPEAT = [
    ("smooth_l1", {"beta": 0.5}), ("log_cosh", {}), ("quantile", {"quantile": 0.2}),
    ("mape", {}), ("msle", {}), ("poisson_nll", {"full": True}), ("tweedie", {}),
    ("gaussian_nll", {}), ("sigmoid_focal", {}), ("softmax_focal", {}),
    ("nll", {"label_smoothing": 0.1}), ("multiclass_hinge", {}), ("categorical_hinge", {}),
    ("cosine_similarity", {}),
]
ROWS = ("softmax_focal", "nll", "multiclass_hinge", "categorical_hinge", "cosine_similarity")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("loss", "params"), REPEAT, ids=[name for name, _ in REPEAT])
def test_bit_identical_repeats_and_batches(loss, params, dtype):
    rng = _rng("repeat", loss)
    shape = (30_000, 5) if loss in ROWS else (150_000,)  # above the parallel threshold
    x, t = _inputs(loss, rng, shape)
    x = x.astype(dtype)
    t = t.astype(dtype) if t.dtype.kind == "f" else t
    w = rng.uniform(0.0, 2.0, size=shape[0]).astype(dtype)
    more = dict(params)
    if loss == "gaussian_nll":
        more["variance"] = rng.uniform(0.5, 2.0, size=shape).astype(dtype)
    a = compute(loss, x, t, sample_weight=w, **more)
    b = compute(loss, x, t, sample_weight=w, **more)
    assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    assert a.gradient.tobytes() == b.gradient.tobytes()
    # A position's SUM gradient does not depend on its batch (serial vs parallel path).
    head_more = dict(more)
    if "variance" in more:
        head_more["variance"] = more["variance"][:1000]
    head = compute(loss, x[:1000], t[:1000], sample_weight=w[:1000], reduction="sum",
                   **head_more)
    full = compute(loss, x, t, sample_weight=w, reduction="sum", **more)
    assert head.gradient.tobytes() == full.gradient[:1000].tobytes()
    # NONE's values add up to SUM (float32 values are each rounded: half an ulp each).
    none = compute(loss, x, t, sample_weight=w, reduction="none", **more)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert math.fsum(none.loss.astype(np.float64).ravel()) == pytest.approx(full.loss, rel=rtol)
