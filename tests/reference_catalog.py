"""Float64 NumPy reference formulas for the extended catalog.

Written from the loss reference (``losses-reference.md``; the section is named in each
docstring) and the defining library's documentation, not from the kernels: plain
vectorised NumPy in float64. Each function returns the unweighted per-position loss;
``expected`` applies sample weights and the reduction with ``reference.reduce``.
"""

from __future__ import annotations

import math

import numpy as np
import reference as ref

KERAS_EPSILON = 1e-7  # keras.backend.epsilon() (section 1.4)

CLASS_LOSSES = ("softmax_focal", "categorical_hinge", "cosine_similarity", "nll",
                "multiclass_hinge")
SPARSE_LOSSES = ("nll", "multiclass_hinge")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _r(predictions, targets) -> np.ndarray:
    return _f64(predictions) - _f64(targets)


# ---------------------------------------------------------------- regression (section 2)

def smooth_l1(predictions, targets, *, beta: float = 1.0) -> np.ndarray:
    """Huber_beta(r) / beta, |r| for beta = 0 (PyTorch SmoothL1Loss, section 2.4)."""
    a = np.abs(_r(predictions, targets))
    if beta == 0.0:
        return a
    return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def log_cosh(predictions, targets) -> np.ndarray:
    """log cosh r (section 2.6) as log1p(2 sinh^2(r / 2)): cosh r = 1 + 2 sinh^2(r/2), and
    NumPy's sinh and log1p keep full precision for small r, where log(cosh r) would not."""
    r = _r(predictions, targets)
    with np.errstate(over="ignore"):
        small = np.log1p(2.0 * np.sinh(0.5 * r) ** 2)
    a = np.abs(r)
    return np.where(a < 300.0, small, a - math.log(2.0))


def quantile(predictions, targets, *, quantile: float = 0.5) -> np.ndarray:
    """tau max(y - p, 0) + (1 - tau) max(p - y, 0) (sklearn mean_pinball_loss, section 2.7)."""
    d = _f64(targets) - _f64(predictions)
    return quantile * np.maximum(d, 0.0) + (1.0 - quantile) * np.maximum(-d, 0.0)


def mape(predictions, targets) -> np.ndarray:
    """100 |y - p| / max(|y|, 1e-7) (Keras MeanAbsolutePercentageError, section 2.8)."""
    y = _f64(targets)
    return 100.0 * np.abs(y - _f64(predictions)) / np.maximum(np.abs(y), KERAS_EPSILON)


def msle(predictions, targets) -> np.ndarray:
    """(log(max(p, eps) + 1) - log(max(y, eps) + 1))^2 (Keras MSLE, section 2.9)."""
    a = np.log1p(np.maximum(_f64(predictions), KERAS_EPSILON))
    b = np.log1p(np.maximum(_f64(targets), KERAS_EPSILON))
    return (a - b) ** 2


def poisson_nll(predictions, targets, *, log_input: bool = True,
                full: bool = False) -> np.ndarray:
    """PyTorch PoissonNLLLoss (section 2.10): e^x - y x, or mu - y log(mu + 1e-8); full adds
    y log y - y + 0.5 log(2 pi y) where y > 1."""
    x, y = _f64(predictions), _f64(targets)
    loss = np.exp(x) - y * x if log_input else x - y * np.log(x + 1e-8)
    if full:
        ys = np.where(y > 1.0, y, 2.0)
        stirling = ys * np.log(ys) - ys + 0.5 * np.log(2.0 * math.pi * ys)
        loss = loss + np.where(y > 1.0, stirling, 0.0)
    return loss


def tweedie(predictions, targets, *, power: float = 1.5) -> np.ndarray:
    """Unit deviance of sklearn mean_tweedie_deviance (section 2.12)."""
    mu, y = _f64(predictions), _f64(targets)
    p = power
    if p == 0.0:
        return (y - mu) ** 2
    if p == 1.0:
        ylog = np.where(y > 0.0, y * np.log(np.where(y > 0.0, y, 1.0) / mu), 0.0)
        return 2.0 * (ylog - y + mu)
    if p == 2.0:
        return 2.0 * (np.log(mu / y) + y / mu - 1.0)
    return 2.0 * (np.maximum(y, 0.0) ** (2.0 - p) / ((1.0 - p) * (2.0 - p))
                  - y * mu ** (1.0 - p) / (1.0 - p) + mu ** (2.0 - p) / (2.0 - p))


def gaussian_nll(predictions, targets, variance, *, full: bool = False) -> np.ndarray:
    """0.5 (log v + (p - y)^2 / v), v = max(var, 1e-6), + 0.5 log 2 pi if full (PyTorch
    GaussianNLLLoss, section 2.11). ``variance`` broadcasts against the predictions."""
    x = _f64(predictions)
    v = np.maximum(_f64(variance), 1e-6)
    if v.shape == x.shape[:-1]:
        v = v[..., None]
    loss = 0.5 * (np.log(v) + (x - _f64(targets)) ** 2 / v)
    return loss + (0.5 * math.log(2.0 * math.pi) if full else 0.0)


# ---------------------------------------------------------------- focal (section 4.8)

def sigmoid_focal(predictions, targets, *, alpha: float = 0.25,
                  gamma: float = 2.0) -> np.ndarray:
    """torchvision sigmoid_focal_loss, reduction='none' (section 4.8)."""
    x, y = _f64(predictions), _f64(targets)
    p = 1.0 / (1.0 + np.exp(-x))
    ce = y * ref.softplus(-x) + (1.0 - y) * ref.softplus(x)
    p_t = p * y + (1.0 - p) * (1.0 - y)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0.0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss


def softmax_focal(predictions, targets, *, alpha: float = 0.25,
                  gamma: float = 2.0) -> np.ndarray:
    """sum_k alpha (1 - p_k)^gamma (-q_k log p_k), p = softmax (Keras
    CategoricalFocalCrossentropy, from_logits, section 4.8; no probability clip)."""
    logp = ref.log_softmax(predictions)
    p = np.exp(logp)
    return (alpha * (1.0 - p) ** gamma * -_f64(targets) * logp).sum(axis=-1)


# ---------------------------------------------------------------- margins (section 3)

def categorical_hinge(predictions, targets) -> np.ndarray:
    """max(0, max_k (1 - y_k) s_k - sum_k y_k s_k + 1) (Keras CategoricalHinge, 3.3)."""
    s, y = _f64(predictions), _f64(targets)
    pos = (y * s).sum(axis=-1)
    neg = ((1.0 - y) * s).max(axis=-1)
    return np.maximum(0.0, neg - pos + 1.0)


def cosine_similarity(predictions, targets) -> np.ndarray:
    """-sum (y / max(|y|, eps)) (p / max(|p|, eps)), eps = 1e-7 (Keras, section 3.7)."""
    x, y = _f64(predictions), _f64(targets)
    nx = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), KERAS_EPSILON)
    ny = np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), KERAS_EPSILON)
    return -((x / nx) * (y / ny)).sum(axis=-1)


def _class_weights(n_classes: int, class_weight) -> np.ndarray:
    return np.ones(n_classes) if class_weight is None else _f64(class_weight)


def multiclass_hinge(predictions, targets, *, ignore_index=None, class_weight=None):
    """w_y max(0, 1 + max_{k != y} s_k - s_y) (Crammer-Singer: optax, sklearn; 3.3).
    Returns (values, weights) per row as ``reference.sparse_categorical_cross_entropy``."""
    s = _f64(predictions)
    y = np.asarray(targets).astype(np.int64)
    keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    ys = np.where(keep, y, 0)
    true = np.take_along_axis(s, ys[..., None], axis=-1)[..., 0]
    others = s.copy()
    np.put_along_axis(others, ys[..., None], -np.inf, axis=-1)
    w = _class_weights(s.shape[-1], class_weight)[ys]
    values = w * np.maximum(0.0, 1.0 + others.max(axis=-1) - true)
    return np.where(keep, values, 0.0), np.where(keep, w, 0.0)


def nll(predictions, targets, *, ignore_index=None, class_weight=None,
        label_smoothing: float = 0.0):
    """PyTorch NLLLoss of log-probabilities (section 4.5), with the two-term smoothing of
    CrossEntropyLoss when label_smoothing > 0. Returns (values, weights) per row."""
    lp = _f64(predictions)
    n_classes = lp.shape[-1]
    y = np.asarray(targets).astype(np.int64)
    keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    ys = np.where(keep, y, 0)
    cw = _class_weights(n_classes, class_weight)
    w = cw[ys]
    values = ((1.0 - label_smoothing) * w * -np.take_along_axis(lp, ys[..., None], -1)[..., 0]
              + (label_smoothing / n_classes) * -(lp * cw).sum(axis=-1))
    return np.where(keep, values, 0.0), np.where(keep, w, 0.0)


_FUNCS = {
    "smooth_l1": smooth_l1, "log_cosh": log_cosh, "quantile": quantile, "pinball": quantile,
    "mape": mape, "msle": msle, "poisson_nll": poisson_nll, "tweedie": tweedie,
    "sigmoid_focal": sigmoid_focal, "softmax_focal": softmax_focal,
    "categorical_hinge": categorical_hinge, "cosine_similarity": cosine_similarity,
}


def position_shape(loss: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1]) if loss in CLASS_LOSSES else tuple(shape)


def expected(loss: str, predictions, targets, *, reduction: str = "mean",
             sample_weight=None, variance=None, **params) -> ref.Expected:
    """The reference result of ``compute`` for one request (values in float64)."""
    shape = position_shape(loss, np.shape(predictions))
    w = ref.position_weights(sample_weight, shape)
    if loss in SPARSE_LOSSES:
        fn = nll if loss == "nll" else multiclass_hinge
        values, class_w = fn(predictions, targets, **params)
        values, w = w * values, w * class_w
    elif loss == "gaussian_nll":
        values = w * gaussian_nll(predictions, targets, variance, **params)
    else:
        values = w * _FUNCS[loss](predictions, targets, **params)
    return ref.Expected(
        loss=ref.reduce(values, w, reduction),
        positions=int(np.prod(shape, dtype=np.int64)),
        positions_counted=int(np.count_nonzero(w)),
        weight_sum=math.fsum(w.ravel()),
    )
