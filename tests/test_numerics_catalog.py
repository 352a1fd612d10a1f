"""Values and gradients of the extended catalog against the float64 NumPy reference.

As ``test_numerics.py``: every loss (with parameter variants) x reduction x dtype x
sample-weight layout; the value against ``reference_catalog.expected``, the float64
gradient against central finite differences of ``compute``'s own loss, the float32
gradient against the float64 gradient of the same inputs. Inputs stay away from kinks and
clamps; those are in ``test_numerics_catalog_edges.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import reference as ref
import reference_catalog as refc
from lossgrad import compute
from test_numerics import (
    FD_ATOL,
    FD_RTOL,
    GRAD32_ATOL,
    GRAD32_RTOL,
    RTOL_FLOAT32,
    _seed,
    assert_loss_matches,
    finite_difference,
    make_sample_weight,
    total,
)

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float64, np.float32)
ELEMENTWISE_SHAPES = ((7,), (4, 2, 3))
CLASS_SHAPES = ((6, 5), (2, 3, 4))
RTOL_FLOAT64 = 1e-10  # exp, log and powers (float64 elementwise math against NumPy's)


@dataclass(frozen=True)
class Case:
    loss: str
    inputs: str
    params: dict = field(default_factory=dict)
    variance: str | None = None  # gaussian_nll: "same", "last1" or "shared"

    @property
    def id(self) -> str:
        parts = [self.loss, self.inputs, *(f"{k}={v}" for k, v in self.params.items()
                                          if k != "class_weight")]
        if "class_weight" in self.params:
            parts.append("class_weight")
        if self.variance:
            parts.append(f"var_{self.variance}")
        return "-".join(parts)


CW = "cw"

ELEMENTWISE_CASES = (
    Case("smooth_l1", "values"),
    Case("smooth_l1", "values", {"beta": 0.5}),
    Case("smooth_l1", "values", {"beta": 0.0}),
    Case("log_cosh", "values"),
    Case("quantile", "values"),
    Case("quantile", "values", {"quantile": 0.9}),
    Case("pinball", "values", {"quantile": 0.1}),
    Case("mape", "values"),
    Case("msle", "positive"),
    Case("poisson_nll", "log_rates"),
    Case("poisson_nll", "log_rates", {"full": True}),
    Case("poisson_nll", "rates", {"log_input": False}),
    Case("poisson_nll", "rates", {"log_input": False, "full": True}),
    Case("tweedie", "counts"),
    Case("tweedie", "counts", {"power": 1.0}),
    Case("tweedie", "positive_targets", {"power": 2.0}),
    Case("tweedie", "positive_targets", {"power": 3.0}),
    Case("tweedie", "rates", {"power": -1.0}),
    Case("tweedie", "values", {"power": 0.0}),
    Case("sigmoid_focal", "logits"),
    Case("sigmoid_focal", "logits", {"alpha": -1.0, "gamma": 0.0}),
    Case("sigmoid_focal", "logits", {"alpha": 0.6, "gamma": 0.5}),
    Case("gaussian_nll", "values", variance="same"),
    Case("gaussian_nll", "values", {"full": True}, variance="last1"),
    Case("gaussian_nll", "values", variance="shared"),
)

CLASS_CASES = (
    Case("softmax_focal", "logit_rows"),
    Case("softmax_focal", "logit_rows", {"alpha": 1.0, "gamma": 0.0}),
    Case("softmax_focal", "logit_rows", {"alpha": 0.5, "gamma": 0.5}),
    Case("categorical_hinge", "one_hot_rows"),
    Case("cosine_similarity", "vectors"),
    Case("nll", "log_rows"),
    Case("nll", "log_rows", {"ignore_index": -100, "class_weight": CW}),
    Case("nll", "log_rows", {"ignore_index": 1, "label_smoothing": 0.1, "class_weight": CW}),
    Case("multiclass_hinge", "scores"),
    Case("multiclass_hinge", "scores", {"ignore_index": 2, "class_weight": CW}),
)


def _loss_name(loss: str) -> str:
    return "quantile" if loss == "pinball" else loss


def make_inputs(case: Case, shape, dtype, rng):
    """Predictions (dtype), targets and variance (or None) for a case, off kinks/clamps."""
    kind = case.inputs
    variance = None
    if kind == "values":
        x = rng.normal(0.0, 2.0, size=shape)
        r = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 3.0, size=shape)
        beta = case.params.get("beta", 1.0)
        if case.loss == "smooth_l1":  # keep |r| at least 0.05 from the kink at beta
            r = np.where(np.abs(np.abs(r) - beta) < 0.05, r + 0.1 * np.sign(r), r)
        y = x - r
        if case.variance:
            vshape = {"same": shape, "last1": shape[:-1] + (1,), "shared": shape[:-1]}
            variance = rng.uniform(0.2, 2.0, size=vshape[case.variance])
    elif kind == "positive":  # msle: a few predictions and targets below the clamp
        x = rng.uniform(0.1, 5.0, size=shape)
        x.flat[0] = -0.5
        y = rng.uniform(-0.5, 5.0, size=shape)
    elif kind == "log_rates":
        x = rng.normal(0.0, 1.0, size=shape)
        y = rng.poisson(2.0, size=shape).astype(np.float64)
    elif kind in ("rates", "counts", "positive_targets"):
        x = rng.uniform(0.2, 4.0, size=shape)
        if kind == "rates":
            y = rng.poisson(2.0, size=shape).astype(np.float64)
            y.flat[-1] = 7.0  # the Stirling term's branch
        elif kind == "counts":
            y = rng.poisson(1.5, size=shape).astype(np.float64)
            y.flat[0] = 0.0
        else:
            y = rng.uniform(0.2, 4.0, size=shape)
    elif kind == "logits":
        x = rng.normal(0.0, 3.0, size=shape)
        hard = rng.integers(0, 2, size=shape).astype(np.float64)
        y = np.where(rng.random(size=shape) < 0.5, hard, rng.random(size=shape))
    elif kind == "logit_rows":
        x = rng.normal(0.0, 2.0, size=shape)
        y = rng.uniform(0.0, 1.0, size=shape) ** 2
        y /= y.sum(axis=-1, keepdims=True)
        y.reshape(-1, shape[-1])[0] = np.eye(shape[-1])[1]
    elif kind == "one_hot_rows":
        x = rng.normal(0.0, 1.0, size=shape)
        y = np.eye(shape[-1])[rng.integers(0, shape[-1], size=shape[:-1])]
    elif kind == "vectors":
        x = rng.normal(0.0, 1.0, size=shape)
        y = rng.normal(0.0, 1.0, size=shape)
    elif kind in ("log_rows", "scores"):
        x = rng.normal(0.0, 1.0, size=shape)
        if kind == "log_rows":
            x = ref.log_softmax(x)
        y = rng.integers(0, shape[-1], size=shape[:-1])
        ignore = case.params.get("ignore_index")
        if ignore is not None:
            y = np.where(rng.random(size=y.shape) < 0.3, ignore, y)
            y.flat[0] = (ignore + 1) % shape[-1]
        return x.astype(dtype), y, None
    else:  # pragma: no cover - a typo in a Case
        raise AssertionError(kind)
    return (x.astype(dtype), y.astype(dtype),
            None if variance is None else variance.astype(dtype))


def make_params(case: Case, shape) -> dict:
    return {k: ([0.5 + 0.75 * c for c in range(shape[-1])] if v == CW else v)
            for k, v in case.params.items()}


def _weight_layouts(case: Case, shape):
    pos = refc.position_shape(_loss_name(case.loss), shape)
    return (None, "batch", "full") if len(pos) > 1 else (None, "batch")


CASES = [
    pytest.param(case, shape, weights,
                 id=f"{case.id}-{'x'.join(map(str, shape))}-w{weights or 'none'}")
    for cases, shapes in ((ELEMENTWISE_CASES, ELEMENTWISE_SHAPES), (CLASS_CASES, CLASS_SHAPES))
    for case in cases for shape in shapes for weights in _weight_layouts(case, shape)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("case", "shape", "weights"), CASES)
def test_value_and_gradient(case: Case, shape, weights, reduction, dtype):
    rng = np.random.default_rng(_seed("catalog", case.id, shape, weights))
    x, y, v = make_inputs(case, shape, dtype, rng)
    name = _loss_name(case.loss)
    pos_shape = refc.position_shape(name, shape)
    sw = make_sample_weight(weights, pos_shape, dtype, rng)
    params = make_params(case, shape)
    extra = {} if v is None else {"variance": v}

    r = compute(case.loss, x, y, reduction=reduction, sample_weight=sw, **extra, **params)
    exp = refc.expected(name, x, y, reduction=reduction, sample_weight=sw, **extra, **params)
    rtol = RTOL_FLOAT32 if dtype == np.float32 else RTOL_FLOAT64
    if name == "tweedie" and reduction == "none":
        # A deviance cancels to ~0 where the mean meets the target; sklearn's formula (the
        # reference) and the kernel's lose the same leading digits there.
        atol = 1e-12 * float(np.max(np.abs(exp.loss)))
        np.testing.assert_allclose(r.loss.astype(np.float64), exp.loss, rtol=rtol, atol=atol)
    else:
        assert_loss_matches(r.loss, exp, rtol, dtype)
    assert r.positions == exp.positions
    assert r.positions_counted == exp.positions_counted
    assert r.weight_sum == pytest.approx(exp.weight_sum, rel=1e-12, abs=0)
    assert r.gradient.shape == x.shape and r.gradient.dtype == x.dtype
    uncounted = ref.position_weights(sw, pos_shape) == 0.0
    if "ignore_index" in params:
        uncounted |= y == params["ignore_index"]
    assert np.all(r.gradient.reshape(pos_shape + (-1,))[uncounted] == 0.0)
    if v is None:
        assert r.variance_gradient is None
    else:
        assert r.variance_gradient.shape == v.shape and r.variance_gradient.dtype == x.dtype

    if dtype == np.float64:
        def f(xx, vv=v):
            more = {} if vv is None else {"variance": vv}
            return total(compute(case.loss, xx, y, reduction=reduction, sample_weight=sw,
                                 gradient=False, **more, **params).loss)

        fd = finite_difference(f, x)
        scale = max(1.0, abs(total(r.loss)), float(np.max(np.abs(fd))))
        np.testing.assert_allclose(r.gradient, fd, rtol=FD_RTOL, atol=FD_ATOL * scale)
        if v is not None:
            fdv = finite_difference(lambda vv: f(x, vv), v)
            scale = max(1.0, abs(total(r.loss)), float(np.max(np.abs(fdv))))
            np.testing.assert_allclose(r.variance_gradient, fdv, rtol=FD_RTOL,
                                       atol=FD_ATOL * scale)
    else:
        up = {} if v is None else {"variance": v.astype(np.float64)}
        y64 = y.astype(np.float64) if y.dtype == np.float32 else y
        r64 = compute(case.loss, x.astype(np.float64), y64, reduction=reduction,
                      sample_weight=None if sw is None else sw.astype(np.float64),
                      **up, **params)
        for got, want in ((r.gradient, r64.gradient),
                          (r.variance_gradient, r64.variance_gradient)):
            if want is not None:
                np.testing.assert_allclose(got.astype(np.float64), want, rtol=GRAD32_RTOL,
                                           atol=GRAD32_ATOL * float(np.max(np.abs(want))))


# ---------------------------------------------------------------- diagonal Hessians

NO_HESSIAN = ("gaussian_nll",)  # needs its variance: tests/test_hessian_focal.py
HESSIAN_CASES = [
    pytest.param(case, shape, id=f"{case.id}-{'x'.join(map(str, shape))}")
    for cases, shape in ((ELEMENTWISE_CASES, (4, 2, 3)), (CLASS_CASES, (2, 3, 4)))
    for case in cases if _loss_name(case.loss) not in NO_HESSIAN
]


@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize(("case", "shape"), HESSIAN_CASES)
def test_exact_hessian_is_the_derivative_of_the_gradient(case: Case, shape, reduction):
    rng = np.random.default_rng(_seed("hessian", case.id, shape))
    x, y, _ = make_inputs(case, shape, np.float64, rng)
    name = _loss_name(case.loss)
    pos_shape = refc.position_shape(name, shape)
    sw = make_sample_weight("batch", pos_shape, np.float64, rng)
    params = make_params(case, shape)
    kw = {"reduction": reduction, "sample_weight": sw, **params}
    r = compute(case.loss, x, y, hessian="exact", **kw)
    plain = compute(case.loss, x, y, **kw)
    assert r.loss == plain.loss  # the Hessian path computes the same loss and gradient
    np.testing.assert_allclose(r.gradient, plain.gradient, rtol=1e-15, atol=0)

    def grad_at(i: int, h: float) -> float:
        xs = x.copy()
        xs.flat[i] += h
        return float(compute(case.loss, xs, y, **kw).gradient.flat[i])

    fd = np.empty_like(x)
    for i in range(x.size):
        h = 1e-6 * max(1.0, abs(float(x.flat[i])))
        fd.flat[i] = (grad_at(i, h) - grad_at(i, -h)) / (2 * h)
    scale = max(1.0, float(np.max(np.abs(fd))))
    np.testing.assert_allclose(r.hessian, fd, rtol=1e-5, atol=1e-7 * scale)

    # constant mode: c with the gradient's weights and scale, 0 where a row is ignored.
    const = compute(case.loss, x, y, hessian="constant", hessian_constant=0.5, **kw)
    w = ref.position_weights(sw, pos_shape)
    if "ignore_index" in params:
        w = np.where(y == params["ignore_index"], 0.0, w)
    divisor = plain.weight_sum if reduction == "mean" else 1.0
    want = np.broadcast_to((0.5 * w / divisor).reshape(pos_shape + (1,) * (x.ndim - len(
        pos_shape))), x.shape)
    np.testing.assert_allclose(const.hessian, want, rtol=1e-15)
