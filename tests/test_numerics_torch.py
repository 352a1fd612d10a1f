"""Cross-checks against PyTorch (CPU) where it has the loss: values and autograd gradients.

The PyTorch side runs in float64 on the request's inputs (float32 inputs upcast), which is
the reference the spec promises float32 results to be within 1e-6 of; for float32
requests PyTorch also runs in float32 and must agree loosely (it accumulates in float32 and
loses relative precision on tiny elements, lossgrad does not). Inputs avoid the places where
lossgrad deliberately differs from PyTorch: BCELoss at p in {0, 1} (gradient of the clamped
expression), all-ignored rows (PyTorch: NaN), KLDivLoss 'mean' (lossgrad: batchmean).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lossgrad import compute

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float64, np.float32)

# (value rtol, gradient rtol) against PyTorch float64.
TIGHT = {np.dtype(np.float64): (1e-10, 1e-10), np.dtype(np.float32): (1e-6, 1e-5)}
LOOSE_FLOAT32 = 1e-4  # against PyTorch float32, relative to the largest magnitude: 1e-5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def torch_run(fn, x: np.ndarray, *args, dtype: torch.dtype):
    """fn(x, *args) with float arrays as ``dtype`` tensors (integer arrays as they are);
    returns the value and d sum(value) / dx by autograd, as NumPy float64."""

    def tensor(a):
        if a is None:
            return None
        a = np.asarray(a)
        t = torch.from_numpy(np.array(a))
        return t.to(dtype) if a.dtype.kind == "f" else t

    xt = tensor(x).requires_grad_(True)
    out = fn(xt, *map(tensor, args))
    out.sum().backward()
    return out.detach().to(torch.float64).numpy(), xt.grad.to(torch.float64).numpy()


def _assert_close(actual, want: np.ndarray, rtol: float, atol_rel: float) -> None:
    atol = atol_rel * float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), want, rtol=rtol, atol=atol)


def check(r, reduction: str, fn, x: np.ndarray, *args) -> None:
    """Compare a lossgrad result with PyTorch running ``fn`` on the same inputs."""
    dtype = x.dtype
    assert r.gradient.dtype == dtype
    assert r.gradient.shape == x.shape
    if reduction == "none":
        assert r.loss.dtype == dtype
    else:
        assert isinstance(r.loss, float)
    value, grad = torch_run(fn, x, *args, dtype=torch.float64)
    if reduction == "none":
        assert r.loss.shape == value.shape
    rtol_v, rtol_g = TIGHT[dtype]
    _assert_close(r.loss, value, rtol_v, rtol_v * 1e-3)
    _assert_close(r.gradient, grad, rtol_g, rtol_g * 1e-1)
    if dtype == np.float32:
        value32, grad32 = torch_run(fn, x, *args, dtype=torch.float32)
        _assert_close(r.loss, value32, LOOSE_FLOAT32, LOOSE_FLOAT32 * 1e-1)
        _assert_close(r.gradient, grad32, LOOSE_FLOAT32, LOOSE_FLOAT32 * 1e-1)


# ---------------------------------------------------------------- regression

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("loss", "module", "params"), [
    ("mae", torch.nn.L1Loss, {}),
    ("l1", torch.nn.L1Loss, {}),
    ("mse", torch.nn.MSELoss, {}),
    ("l2", torch.nn.MSELoss, {}),
    ("huber", torch.nn.HuberLoss, {}),
    ("huber", torch.nn.HuberLoss, {"delta": 0.5}),
    ("huber", torch.nn.HuberLoss, {"delta": 2.0}),
], ids=["L1Loss", "L1Loss-l1", "MSELoss", "MSELoss-l2", "HuberLoss", "HuberLoss-delta0.5",
        "HuberLoss-delta2"])
def test_regression(loss, module, params, reduction, dtype):
    rng = _rng("regression", loss, params)
    x = rng.normal(0.0, 2.0, size=(4, 2, 3))
    r = rng.choice([-1.0, 1.0], size=x.shape) * rng.uniform(0.1, 3.0, size=x.shape)
    delta = params.get("delta", 1.0)
    r = np.where(np.abs(np.abs(r) - delta) < 0.05, r + 0.1 * np.sign(r), r)  # off the kink
    x, y = x.astype(dtype), (x - r).astype(dtype)
    fn = module(reduction=reduction, **params)
    check(compute(loss, x, y, reduction=reduction, **params), reduction, fn, x, y)


# ---------------------------------------------------------------- binary cross-entropy

def _binary_targets(rng, shape) -> np.ndarray:
    hard = rng.integers(0, 2, size=shape).astype(np.float64)
    return np.where(rng.random(size=shape) < 0.5, hard, rng.random(size=shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_loss(reduction, dtype):
    rng = _rng("BCELoss")
    p = rng.uniform(0.05, 0.95, size=(5, 3)).astype(dtype)
    y = _binary_targets(rng, p.shape).astype(dtype)
    check(compute("binary_cross_entropy", p, y, reduction=reduction), reduction,
          lambda pt, yt: F.binary_cross_entropy(pt, yt, reduction=reduction), p, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_bce_loss_elementwise_weight(reduction, dtype):
    # BCELoss(weight=w) multiplies each element by w: its 'sum' and 'none' are lossgrad's
    # with full per-position sample weights (its 'mean' divides by numel: section 1.3).
    rng = _rng("BCELoss-weight")
    p = rng.uniform(0.05, 0.95, size=(4, 6)).astype(dtype)
    y = _binary_targets(rng, p.shape).astype(dtype)
    w = rng.uniform(0.0, 2.0, size=p.shape).astype(dtype)
    r = compute("binary_cross_entropy", p, y, reduction=reduction, sample_weight=w)
    check(r, reduction,
          lambda pt, yt, wt: F.binary_cross_entropy(pt, yt, weight=wt, reduction=reduction),
          p, y, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weight", (None, 3.0, 0.25))
@pytest.mark.parametrize("loss", ("sigmoid_cross_entropy", "binary_cross_entropy"))
def test_bce_with_logits_loss(loss, pos_weight, reduction, dtype):
    rng = _rng("BCEWithLogitsLoss", pos_weight)
    x = rng.normal(0.0, 4.0, size=(4, 2, 3)).astype(dtype)
    y = _binary_targets(rng, x.shape).astype(dtype)
    params = {} if pos_weight is None else {"pos_weight": pos_weight}
    if loss == "binary_cross_entropy":
        params["from_logits"] = True
    pw = None if pos_weight is None else np.asarray(pos_weight)
    check(compute(loss, x, y, reduction=reduction, **params), reduction,
          lambda xt, yt, pwt: F.binary_cross_entropy_with_logits(
              xt, yt, pos_weight=pwt, reduction=reduction),
          x, y, pw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_bce_with_logits_batch_weight(reduction, dtype):
    # lossgrad's batch weights (N,) broadcast over the other axes like PyTorch's (N, 1).
    rng = _rng("BCEWithLogitsLoss-weight")
    x = rng.normal(0.0, 3.0, size=(6, 4)).astype(dtype)
    y = _binary_targets(rng, x.shape).astype(dtype)
    w = rng.uniform(0.0, 2.0, size=6).astype(dtype)
    r = compute("sigmoid_cross_entropy", x, y, reduction=reduction, sample_weight=w,
                pos_weight=2.0)
    check(r, reduction,
          lambda xt, yt, wt, pwt: F.binary_cross_entropy_with_logits(
              xt, yt, weight=wt[:, None], pos_weight=pwt, reduction=reduction),
          x, y, w, np.asarray(2.0))


# ---------------------------------------------------------------- softmax cross-entropy

def _to_torch_layout(a: torch.Tensor) -> torch.Tensor:
    """Class axis last (lossgrad) -> class axis 1 (PyTorch)."""
    return a if a.dim() == 2 else a.movedim(-1, 1)


CLASS_WEIGHT = [0.5, 1.0, 2.0, 1.5]
SPARSE_VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"class_weight": CLASS_WEIGHT}, id="weight"),
    pytest.param({"ignore_index": 2}, id="ignore2"),
    pytest.param({"ignore_index": -100}, id="ignore-100"),
    pytest.param({"label_smoothing": 0.1}, id="smoothing"),
    pytest.param({"class_weight": CLASS_WEIGHT, "label_smoothing": 0.2}, id="weight-smoothing"),
    pytest.param({"class_weight": CLASS_WEIGHT, "label_smoothing": 0.1, "ignore_index": 1},
                 id="weight-smoothing-ignore1"),
]
NO_SMOOTHING = [p for p in SPARSE_VARIANTS if "label_smoothing" not in p.values[0]]
SMOOTHING = [p for p in SPARSE_VARIANTS if "label_smoothing" in p.values[0]]


def _sparse_targets(rng, shape, n_classes, params) -> np.ndarray:
    y = rng.integers(0, n_classes, size=shape)
    ignore = params.get("ignore_index")
    if ignore is not None:
        y = np.where(rng.random(size=shape) < 0.3, ignore, y)
        y.flat[0] = (ignore + 1) % n_classes  # at least one row counts
    return y


def _torch_ce(loss_fn, params, reduction: str, log=None):
    """fn(x, y, class_weight) calling F.cross_entropy / F.nll_loss with lossgrad's params."""

    def fn(xt, yt, wt):
        inp = _to_torch_layout(xt if log is None else log(xt))
        kw = {"weight": wt, "reduction": reduction}
        if "ignore_index" in params:
            kw["ignore_index"] = params["ignore_index"]
        if "label_smoothing" in params:
            kw["label_smoothing"] = params["label_smoothing"]
        return loss_fn(inp, yt, **kw)

    return fn


def _class_weight(params):
    return None if "class_weight" not in params else np.asarray(params["class_weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((7, 4), (2, 3, 4)), ids=("7x4", "2x3x4"))
@pytest.mark.parametrize("params", SPARSE_VARIANTS)
def test_cross_entropy_class_indices(params, shape, reduction, dtype):
    rng = _rng("CE-indices", shape, sorted(params))
    x = rng.normal(0.0, 2.0, size=shape).astype(dtype)
    y = _sparse_targets(rng, shape[:-1], shape[-1], params)
    r = compute("sparse_categorical_cross_entropy", x, y, reduction=reduction,
                from_logits=True, **params)
    check(r, reduction, _torch_ce(F.cross_entropy, params, reduction), x, y,
          _class_weight(params))


def _clamped_log(p: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.log(p), min=-100.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((7, 4), (2, 3, 4)), ids=("7x4", "2x3x4"))
@pytest.mark.parametrize("params", NO_SMOOTHING)
def test_nll_loss_of_clamped_log_probabilities(params, shape, reduction, dtype):
    # Sparse CE on probabilities is NLLLoss of max(log p, -100) (catalog; section 4.5).
    rng = _rng("NLL", shape, sorted(params))
    u = rng.uniform(0.05, 1.0, size=shape)
    p = (u / u.sum(axis=-1, keepdims=True)).astype(dtype)
    y = _sparse_targets(rng, shape[:-1], shape[-1], params).astype(np.int32)
    r = compute("sparse_categorical_cross_entropy", p, y, reduction=reduction, **params)
    check(r, reduction, _torch_ce(F.nll_loss, params, reduction, log=_clamped_log), p,
          y.astype(np.int64), _class_weight(params))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("params", SMOOTHING)
def test_sparse_probabilities_label_smoothing_value(params, reduction, dtype):
    # On normalised rows F.cross_entropy(log p) equals lossgrad's smoothed NLL of log p
    # (log_softmax(log p) = log p when sum p = 1). Values only: the gradients differ by
    # design (PyTorch's log_softmax renormalises, lossgrad does not).
    rng = _rng("CE-probs-smoothing", sorted(params))
    u = rng.uniform(0.05, 1.0, size=(7, 4))
    p = (u / u.sum(axis=-1, keepdims=True)).astype(dtype)
    y = _sparse_targets(rng, (7,), 4, params)
    value, _ = torch_run(_torch_ce(F.cross_entropy, params, reduction, log=torch.log),
                         p.astype(np.float64) / p.sum(axis=-1, keepdims=True, dtype=np.float64),
                         y, _class_weight(params), dtype=torch.float64)
    r = compute("sparse_categorical_cross_entropy", p, y, reduction=reduction, **params)
    # float32 rows are renormalised (in float64) for PyTorch: a relative change < 1e-7.
    rtol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-6
    np.testing.assert_allclose(np.asarray(r.loss, dtype=np.float64), value, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.15))
@pytest.mark.parametrize("shape", ((6, 5), (2, 3, 4)), ids=("6x5", "2x3x4"))
def test_cross_entropy_probability_targets(shape, label_smoothing, reduction, dtype):
    rng = _rng("CE-probs", shape, label_smoothing)
    x = rng.normal(0.0, 2.0, size=shape).astype(dtype)
    q = rng.uniform(0.0, 1.0, size=shape) ** 2
    q = (q / q.sum(axis=-1, keepdims=True)).astype(dtype)
    r = compute("categorical_cross_entropy", x, q, reduction=reduction, from_logits=True,
                label_smoothing=label_smoothing)
    check(r, reduction,
          lambda xt, qt: F.cross_entropy(_to_torch_layout(xt), _to_torch_layout(qt),
                                         reduction=reduction, label_smoothing=label_smoothing),
          x, q)


# ---------------------------------------------------------------- KL divergence

def _kl_inputs(rng, shape, dtype):
    q = rng.uniform(0.05, 1.0, size=shape)
    q = q / q.sum(axis=-1, keepdims=True)
    p = rng.uniform(0.0, 1.0, size=shape) ** 2
    p.reshape(-1, shape[-1])[0, 0] = 0.0  # a zero target: contributes exactly 0
    p = p / p.sum(axis=-1, keepdims=True)
    return q.astype(dtype), p.astype(dtype)


def _kl_torch(reduction: str, log=None):
    """F.kl_div with lossgrad's reductions: NONE is the per-row sum of PyTorch's 'none',
    MEAN is 'batchmean' (2-D input only)."""

    def fn(qt: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
        log_q = qt if log is None else log(qt)
        if reduction == "none":
            return F.kl_div(log_q, pt, reduction="none").sum(dim=-1)
        return F.kl_div(log_q, pt, reduction="batchmean" if reduction == "mean" else "sum")

    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_predictions", (False, True))
def test_kl_div(log_predictions, reduction, dtype):
    rng = _rng("KLDiv", log_predictions)
    q, p = _kl_inputs(rng, (6, 5), dtype)
    if log_predictions:
        lq = np.log(q.astype(np.float64)).astype(dtype)
        r = compute("kl_divergence", lq, p, reduction=reduction, log_predictions=True)
        check(r, reduction, _kl_torch(reduction), lq, p)
    else:
        r = compute("kl_divergence", q, p, reduction=reduction)
        check(r, reduction, _kl_torch(reduction, log=torch.log), q, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_kl_div_three_dims(reduction, dtype):
    # PyTorch's batchmean divides by size(0), so it is lossgrad's per-row mean only on 2-D
    # input; 'sum' and per-row 'none' agree for any rank.
    rng = _rng("KLDiv-3d")
    q, p = _kl_inputs(rng, (2, 3, 4), dtype)
    r = compute("kl_divergence", q, p, reduction=reduction)
    check(r, reduction, _kl_torch(reduction, log=torch.log), q, p)
