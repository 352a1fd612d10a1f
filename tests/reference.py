"""Float64 NumPy reference formulas for the numerics tests.

Written from the formulas in the project's loss reference (``losses-reference.md``, the
section is named in each docstring) and the PyTorch/Keras documentation, not from the
kernels: plain vectorised NumPy, every input upcast to float64, sums with ``math.fsum``.

Each loss function returns the per-position unweighted loss ``l_i`` (one value per element
for elementwise losses, one per row along the last axis for class losses).
``sparse_categorical_cross_entropy`` is the exception: class weights enter its value
(PyTorch's two-term label smoothing mixes them in), so it returns the class-weighted values
and the per-row weights separately. ``expected`` applies sample weights and the reduction
(reference section 1.3 and the proto header: NONE -> w_i l_i, SUM -> sum w_i l_i,
MEAN -> sum w_i l_i / sum w_i, 0 when every weight is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_FLOOR = -100.0  # PyTorch BCELoss clamps each log at -100 (reference section 1.4).

ELEMENTWISE = (
    "mae", "mse", "rmse", "huber", "pseudo_huber", "hinge", "squared_hinge",
    "binary_cross_entropy",
)
DENSE_ROWS = ("categorical_cross_entropy", "kl_divergence")
SPARSE_ROWS = ("sparse_categorical_cross_entropy",)

# alias -> (canonical name, parameters the alias fixes)
ALIASES: dict[str, tuple[str, dict[str, object]]] = {
    "l1": ("mae", {}),
    "l2": ("mse", {}),
    "sigmoid_cross_entropy": ("binary_cross_entropy", {"from_logits": True}),
}


def canonical(loss: str) -> tuple[str, dict[str, object]]:
    """Return the canonical loss name and the parameters an alias fixes."""
    return ALIASES.get(loss, (loss, {}))


def is_class_loss(loss: str) -> bool:
    return canonical(loss)[0] in DENSE_ROWS + SPARSE_ROWS


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- shared math (section 1.6)

def softplus(t: np.ndarray) -> np.ndarray:
    """log(1 + e^t) = max(t, 0) + log1p(e^-|t|) (reference section 1.6)."""
    t = _f64(t)
    return np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """x - LSE(x) along the last axis, LSE with the row maximum subtracted (section 1.6)."""
    x = _f64(x)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def clamped_log(p: np.ndarray) -> np.ndarray:
    """max(log p, -100): PyTorch BCELoss's clamp, log 0 -> -100 (section 1.4)."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(_f64(p)), LOG_FLOOR)


def clamped_log1m(p: np.ndarray) -> np.ndarray:
    """max(log(1 - p), -100), the second BCELoss term (section 1.4)."""
    with np.errstate(divide="ignore"):
        return np.maximum(np.log1p(-_f64(p)), LOG_FLOOR)


def signed_labels(y: np.ndarray) -> np.ndarray:
    """Keras Hinge label handling (section 3.1): all in {0, 1} -> 2y - 1, else as is."""
    y = _f64(y)
    if np.all((y == 0.0) | (y == 1.0)):
        return 2.0 * y - 1.0
    return y


# ---------------------------------------------------------------- regression (section 2)

def mae(predictions, targets) -> np.ndarray:
    """|p - y|: PyTorch L1Loss, reduction='none' (section 2.1)."""
    return np.abs(_f64(predictions) - _f64(targets))


def mse(predictions, targets) -> np.ndarray:
    """(p - y)^2: PyTorch MSELoss, reduction='none' (section 2.2)."""
    return (_f64(predictions) - _f64(targets)) ** 2


def huber(predictions, targets, *, delta: float = 1.0) -> np.ndarray:
    """0.5 r^2 if |r| < delta else delta (|r| - delta/2): PyTorch HuberLoss (section 2.4)."""
    r = np.abs(_f64(predictions) - _f64(targets))
    return np.where(r < delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def pseudo_huber(predictions, targets, *, delta: float = 1.0) -> np.ndarray:
    """delta^2 (sqrt(1 + (r/delta)^2) - 1) in SciPy's expm1/log1p form (section 2.5)."""
    r = _f64(predictions) - _f64(targets)
    return delta * delta * np.expm1(0.5 * np.log1p((r / delta) ** 2))


def rmse_expected(predictions, targets, weights: np.ndarray, reduction: str):
    """sqrt of the weighted MSE under the same reduction (section 2.3, catalog).

    NONE gives sqrt(w_i r_i^2) per position; SUM sqrt(sum w r^2); MEAN
    sqrt(sum w r^2 / sum w), 0 when every weight is 0.
    """
    sq = weights * mse(predictions, targets)
    if reduction == "none":
        return np.sqrt(sq)
    total = math.fsum(sq.ravel())
    if reduction == "sum":
        return math.sqrt(total)
    wsum = math.fsum(weights.ravel())
    return 0.0 if wsum == 0.0 else math.sqrt(total / wsum)


# ---------------------------------------------------------------- margin (section 3)

def hinge(predictions, targets) -> np.ndarray:
    """max(0, 1 - y p), labels mapped as Keras Hinge (section 3.1)."""
    return np.maximum(0.0, 1.0 - signed_labels(targets) * _f64(predictions))


def squared_hinge(predictions, targets) -> np.ndarray:
    """max(0, 1 - y p)^2, labels mapped as Keras SquaredHinge (section 3.2)."""
    return hinge(predictions, targets) ** 2


# ---------------------------------------------------------------- probabilistic (section 4)

def binary_cross_entropy(
    predictions, targets, *, from_logits: bool = False, pos_weight: float | None = None,
    label_smoothing: float = 0.0,
) -> np.ndarray:
    """Binary cross-entropy per element (sections 4.1, 4.2, 4.6).

    Targets are smoothed as Keras BinaryCrossentropy: y' = y (1 - eps) + eps/2.
    Probabilities: -[pw y' log p + (1 - y') log(1 - p)] with each log floored at -100
    (PyTorch BCELoss). Logits: -[pw y' log sigmoid(x) + (1 - y') log sigmoid(-x)]
    = pw y' softplus(-x) + (1 - y') softplus(x) (PyTorch BCEWithLogitsLoss with
    pos_weight; this sum of two non-negative terms has no cancellation, unlike the
    equal (1 - y') x + (1 + (pw - 1) y') softplus(-x) of section 4.2).
    """
    y = _f64(targets) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    pw = 1.0 if pos_weight is None else float(pos_weight)
    x = _f64(predictions)
    if from_logits:
        return pw * y * softplus(-x) + (1.0 - y) * softplus(x)
    return -(pw * y * clamped_log(x) + (1.0 - y) * clamped_log1m(x))


def _log_probabilities(predictions, from_logits: bool) -> np.ndarray:
    return log_softmax(predictions) if from_logits else clamped_log(predictions)


def categorical_cross_entropy(
    predictions, targets, *, from_logits: bool = False, label_smoothing: float = 0.0,
) -> np.ndarray:
    """-sum_k q'_k log p_k per row, q' = (1 - eps) q + eps/C (sections 4.3, 4.4, 4.6).

    Logits go through log-softmax (PyTorch CrossEntropyLoss with probability targets);
    probabilities use log p floored at -100 without renormalisation (NLL of log p).
    """
    logp = _log_probabilities(predictions, from_logits)
    n_classes = logp.shape[-1]
    q = _f64(targets) * (1.0 - label_smoothing) + label_smoothing / n_classes
    return -(q * logp).sum(axis=-1)


def sparse_categorical_cross_entropy(
    predictions, targets, *, from_logits: bool = False, ignore_index: int | None = None,
    label_smoothing: float = 0.0, class_weight=None,
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch CrossEntropyLoss / NLLLoss with class indices (section 4.5).

    Returns ``(values, weights)`` per row: values = (1 - eps) w_y (-log p_y)
    + (eps/C) sum_c w_c (-log p_c) (LossNLL.cpp's two-term smoothing), weights = w_y;
    both 0 for ignored rows. MEAN divides the sum of values by the sum of weights.
    """
    logp = _log_probabilities(predictions, from_logits)
    n_classes = logp.shape[-1]
    cw = np.ones(n_classes) if class_weight is None else _f64(class_weight)
    y = np.asarray(targets).astype(np.int64)
    keep = np.ones(y.shape, dtype=bool) if ignore_index is None else y != ignore_index
    y_safe = np.where(keep, y, 0)
    nll_y = -np.take_along_axis(logp, y_safe[..., None], axis=-1)[..., 0]
    w_y = cw[y_safe]
    smooth = -(logp * cw).sum(axis=-1)
    values = (1.0 - label_smoothing) * w_y * nll_y + (label_smoothing / n_classes) * smooth
    return np.where(keep, values, 0.0), np.where(keep, w_y, 0.0)


def kl_divergence(predictions, targets, *, log_predictions: bool = False) -> np.ndarray:
    """sum_k p_k (log p_k - log q_k) per row; p_k = 0 contributes 0 (section 4.7).

    PyTorch KLDivLoss pointwise term summed over the last axis; with probability
    predictions log q is floored at -100.
    """
    p = _f64(targets)
    logq = _f64(predictions) if log_predictions else clamped_log(predictions)
    logp = np.log(np.where(p > 0.0, p, 1.0))
    return np.where(p > 0.0, p * (logp - logq), 0.0).sum(axis=-1)


_ELEMENTWISE_FUNCS = {
    "mae": mae, "mse": mse, "huber": huber, "pseudo_huber": pseudo_huber,
    "hinge": hinge, "squared_hinge": squared_hinge,
    "binary_cross_entropy": binary_cross_entropy,
    "categorical_cross_entropy": categorical_cross_entropy,
    "kl_divergence": kl_divergence,
}


# ---------------------------------------------------------------- weights and reductions

def position_shape(loss: str, predictions_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Elementwise: the predictions' shape; class losses: without the class axis."""
    return tuple(predictions_shape[:-1]) if is_class_loss(loss) else tuple(predictions_shape)


def position_weights(sample_weight, shape: tuple[int, ...]) -> np.ndarray:
    """Sample weights as one float64 value per position.

    Shape (N,) weighs the batch axis and broadcasts over the remaining position axes;
    otherwise the weights must have the per-position shape (proto ComputeLossRequest).
    """
    if sample_weight is None:
        return np.ones(shape)
    w = _f64(sample_weight)
    if w.shape == shape:
        return w.copy()
    assert w.shape == shape[:1], (w.shape, shape)
    return np.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - 1)), shape).copy()


def reduce(values: np.ndarray, weights: np.ndarray, reduction: str):
    """NONE: values as they are; SUM: fsum(values); MEAN: fsum(values) / fsum(weights).

    ``values`` are the weighted per-position values w_i l_i; MEAN is 0 when every weight
    is 0 (proto header).
    """
    if reduction == "none":
        return values
    total = math.fsum(values.ravel())
    if reduction == "sum":
        return total
    wsum = math.fsum(weights.ravel())
    return 0.0 if wsum == 0.0 else total / wsum


@dataclass(frozen=True)
class Expected:
    loss: float | np.ndarray
    positions: int
    positions_counted: int
    weight_sum: float


def expected(
    loss: str, predictions, targets, *, reduction: str = "mean", sample_weight=None,
    **params,
) -> Expected:
    """The reference result of ``compute`` for one request (values in float64)."""
    name, preset = canonical(loss)
    params = {**preset, **params}
    shape = position_shape(name, np.shape(predictions))
    w = position_weights(sample_weight, shape)
    if name == "rmse":
        value = rmse_expected(predictions, targets, w, reduction)
    elif name == "sparse_categorical_cross_entropy":
        values, class_w = sparse_categorical_cross_entropy(predictions, targets, **params)
        values, w = w * values, w * class_w
        value = reduce(values, w, reduction)
    else:
        per_position = _ELEMENTWISE_FUNCS[name](predictions, targets, **params)
        value = reduce(w * per_position, w, reduction)
    return Expected(
        loss=value,
        positions=int(np.prod(shape, dtype=np.int64)),
        positions_counted=int(np.count_nonzero(w)),
        weight_sum=math.fsum(w.ravel()),
    )
