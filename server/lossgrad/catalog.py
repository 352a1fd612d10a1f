"""The loss catalog: names, aliases, inputs, parameters with defaults and ranges.

This table is the single source of what the service accepts. The engine validates
requests against it and ``ListLosses`` serves it as it is. The types of its entries are
in :mod:`lossgrad.specs` (and importable from here).
"""

from __future__ import annotations

from .errors import UNKNOWN_LOSS, InvalidArgumentError
from .specs import (
    ALL_HESSIAN_MODES,
    CONVENTIONS,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    HessianMode,
    InputKind,
    InputSpec,
    Layout,
    LossSpec,
    ParamSpec,
    ParamType,
    PluginSource,
)

__all__ = ["ALL_HESSIAN_MODES", "CONVENTIONS", "FLOAT_DTYPES", "INDEX_DTYPES", "LOSSES",
           "HessianMode", "InputKind", "InputSpec", "Layout", "LossSpec", "ParamSpec",
           "ParamType", "PluginSource", "all_losses", "lookup", "register", "taken_names"]


_VALUES = InputSpec(InputKind.VALUES, FLOAT_DTYPES, "real values, any shape with >= 1 dimension")
_SAME_VALUES = InputSpec(InputKind.VALUES, FLOAT_DTYPES + INDEX_DTYPES,
                         "real values, same shape as predictions (integers are converted)")
_SCORES = InputSpec(InputKind.SCORES, FLOAT_DTYPES, "raw decision scores, any shape")
_LABELS = InputSpec(
    InputKind.SIGNED_LABELS, FLOAT_DTYPES + INDEX_DTYPES,
    "same shape as predictions; all in {-1, 1}, or all in {0, 1} (then mapped to {-1, 1})",
)

DELTA = ParamSpec("delta", ParamType.DOUBLE, 1.0, "threshold (huber) or scale (pseudo_huber)",
                  minimum=0.0, minimum_inclusive=False)
FROM_LOGITS = ParamSpec("from_logits", ParamType.BOOL, False,
                        "predictions are logits instead of probabilities")
SMOOTHING = ParamSpec("label_smoothing", ParamType.DOUBLE, 0.0, "label smoothing epsilon",
                      minimum=0.0, maximum=1.0, maximum_inclusive=False)
POS_WEIGHT = ParamSpec("pos_weight", ParamType.DOUBLE, None,
                       "weight of the positive term (PyTorch pos_weight); unset means 1",
                       minimum=0.0, minimum_inclusive=False)
IGNORE_INDEX = ParamSpec("ignore_index", ParamType.INT64, None,
                         "positions whose target equals this index get weight 0")
CLASS_WEIGHT = ParamSpec("class_weight", ParamType.DOUBLE_LIST, None,
                         "one non-negative weight per class (length C)", minimum=0.0)
LOG_PREDICTIONS = ParamSpec("log_predictions", ParamType.BOOL, False,
                            "predictions are log-probabilities log q instead of q")

BETA = ParamSpec("beta", ParamType.DOUBLE, 1.0,
                 "width of the quadratic zone; 0 gives L1 (PyTorch SmoothL1Loss beta)",
                 minimum=0.0)
QUANTILE = ParamSpec("quantile", ParamType.DOUBLE, 0.5,
                     "quantile level tau (scikit-learn mean_pinball_loss alpha)",
                     minimum=0.0, minimum_inclusive=False, maximum=1.0, maximum_inclusive=False)
LOG_INPUT = ParamSpec("log_input", ParamType.BOOL, True,
                      "predictions are log-rates log mu instead of rates mu")
FULL = ParamSpec("full", ParamType.BOOL, False,
                 "add the constant term: Stirling's approximation of log(y!) where y > 1 "
                 "(poisson_nll), 0.5 log(2 pi) (gaussian_nll)")
POWER = ParamSpec("power", ParamType.DOUBLE, 1.5,
                  "Tweedie power p: p <= 0 or p >= 1 (0 < p < 1 is rejected); 0 normal, "
                  "1 Poisson, 2 gamma, 3 inverse Gaussian (scikit-learn's default is 0)")
FOCAL_ALPHA = ParamSpec("alpha", ParamType.DOUBLE, 0.25,
                        "weight of the positive class, 1 - alpha for the negative; negative "
                        "turns the weighting off (torchvision)", maximum=1.0)
SOFTMAX_FOCAL_ALPHA = ParamSpec("alpha", ParamType.DOUBLE, 0.25,
                                "scale of the whole loss (Keras: always applied)", minimum=0.0)
GAMMA = ParamSpec("gamma", ParamType.DOUBLE, 2.0, "focusing exponent on (1 - p_t)",
                  minimum=0.0)

_PROB_OR_LOGIT = "probabilities in [0, 1], or logits when from_logits=true"
_CLASS_TARGETS = InputSpec(
    InputKind.CLASS_INDICES, INDEX_DTYPES,
    "class indices in [0, C) (or ignore_index), shape = predictions' shape without the last axis",
)

LOSSES: tuple[LossSpec, ...] = (
    LossSpec(
        "mae", Layout.ELEMENTWISE, "mean absolute error |p - y|; gradient sign(p - y), 0 at 0",
        "PyTorch L1Loss", _VALUES, _SAME_VALUES, aliases=("l1",),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="0 (piecewise linear); GBMs run L1 with a constant h = 1 (XGBoost "
                "reg:absoluteerror, LightGBM regression_l1, before their leaf refits)",
    ),
    LossSpec(
        "mse", Layout.ELEMENTWISE, "squared error (p - y)^2", "PyTorch MSELoss",
        _VALUES, _SAME_VALUES, aliases=("l2",),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="2; XGBoost reg:squarederror and LightGBM regression use r^2 / 2 "
                "(gradient r, Hessian 1): half of these",
    ),
    LossSpec(
        "rmse", Layout.ELEMENTWISE,
        "square root of mse under the same reduction and weights; gradient 0 where mse is 0",
        "scikit-learn root_mean_squared_error (single output)", _VALUES, _SAME_VALUES,
        hessian_modes=(HessianMode.EXACT,),
        hessian="exact only (not separable, so no per-position floor or constant): "
                "w_i / (D R) - g_i^2 / R with g the gradient, R the rmse and D the sum of "
                "the weights (mean) or 1 (sum): the diagonal of a dense Hessian; 0 where "
                "R = 0, and 0 for reduction none (sqrt(w) |r| per position)",
    ),
    LossSpec(
        "huber", Layout.ELEMENTWISE,
        "0.5 r^2 if |r| < delta else delta (|r| - 0.5 delta), r = p - y", "PyTorch HuberLoss",
        _VALUES, _SAME_VALUES, params=(DELTA,),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="1 for |r| <= delta (the quadratic side at the boundary), 0 outside; "
                "LightGBM's huber uses h = 1 everywhere (constant)",
    ),
    LossSpec(
        "pseudo_huber", Layout.ELEMENTWISE,
        "delta^2 (sqrt(1 + (r/delta)^2) - 1), r = p - y", "SciPy special.pseudo_huber",
        _VALUES, _SAME_VALUES, params=(DELTA,),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="(1 + (r/delta)^2)^(-3/2), in (0, 1]",
    ),
    LossSpec(
        "hinge", Layout.ELEMENTWISE, "max(0, 1 - y p); gradient 0 at the margin",
        "Keras Hinge (per element)", _SCORES, _LABELS,
        hessian_modes=ALL_HESSIAN_MODES, hessian="0 (piecewise linear)",
    ),
    LossSpec(
        "squared_hinge", Layout.ELEMENTWISE, "max(0, 1 - y p)^2",
        "Keras SquaredHinge (per element)", _SCORES, _LABELS,
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="2 where 1 - y p > 0, else 0 (0 at the margin)",
    ),
    LossSpec(
        "binary_cross_entropy", Layout.ELEMENTWISE,
        "-[pw y log p + (1 - y) log(1 - p)], logs floored at -100; stable softplus form for logits",
        "PyTorch BCELoss / BCEWithLogitsLoss; label smoothing as Keras",
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES, _PROB_OR_LOGIT),
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES + INDEX_DTYPES,
                  "probabilities in [0, 1] (or 0/1 labels), same shape as predictions"),
        params=(FROM_LOGITS, POS_WEIGHT, SMOOTHING),
        aliases=("sigmoid_cross_entropy",),
        alias_presets={"sigmoid_cross_entropy": {"from_logits": True}},
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="logits: (1 + (pw - 1) t) s (1 - s), s = sigmoid(x), t the smoothed target "
                "(XGBoost binary:logistic is this clipped at 1e-16, the default floor); "
                "probabilities: pw t / p^2 + (1 - t) / (1 - p)^2, a term 0 where its log "
                "floor is active",
    ),
    LossSpec(
        "categorical_cross_entropy", Layout.DENSE_ROWS,
        "-sum_k q_k log p_k over the last axis; probability input floored at log -100, "
        "logits through a stable log-softmax",
        "PyTorch CrossEntropyLoss with probability targets (logits); NLL of log p (probabilities)",
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  _PROB_OR_LOGIT + "; shape (..., C), C on the last axis"),
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  "probability rows in [0, 1], same shape as predictions"),
        params=(FROM_LOGITS, SMOOTHING),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="the diagonal: logits: (sum_k q'_k) p_k (1 - p_k), p = softmax(x), of the "
                "dense (sum q') (diag p - p p^T); probabilities: q'_k / p_k^2, 0 where the "
                "log floor is active",
    ),
    LossSpec(
        "sparse_categorical_cross_entropy", Layout.SPARSE_ROWS,
        "-w_y log p_y for integer class targets; PyTorch's two-term label smoothing",
        "PyTorch CrossEntropyLoss with class indices (logits) / NLLLoss of log p (probabilities)",
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  _PROB_OR_LOGIT + "; shape (..., C), C on the last axis"),
        InputSpec(InputKind.CLASS_INDICES, INDEX_DTYPES,
                  "class indices in [0, C) (or ignore_index), shape = predictions' shape "
                  "without the last axis"),
        params=(FROM_LOGITS, IGNORE_INDEX, SMOOTHING, CLASS_WEIGHT),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="the diagonal: logits: ((1 - eps) w_y + (eps/C) sum_c w_c) p_k (1 - p_k), "
                "p = softmax(x) (XGBoost multi:softprob uses twice p (1 - p), LightGBM "
                "multiclass C/(C-1) times); probabilities: ((1 - eps) w_y [k = y] + "
                "(eps/C) w_k) / p_k^2, 0 where the log floor is active; 0 on ignored rows",
    ),
    LossSpec(
        "kl_divergence", Layout.DENSE_ROWS,
        "KL(p || q) = sum_k p_k (log p_k - log q_k) over the last axis; p_k = 0 contributes 0",
        "PyTorch KLDivLoss (reduction='batchmean' on 2-D input)",
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  "model probabilities q in [0, 1] (log floored at -100), or log q when "
                  "log_predictions=true; shape (..., C)"),
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  "target probabilities p in [0, 1], same shape as predictions"),
        params=(LOG_PREDICTIONS,),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="probabilities: p_k / q_k^2, 0 where p_k = 0 or the log floor is active; "
                "log q: 0 (linear in log q)",
    ),
    LossSpec(
        "smooth_l1", Layout.ELEMENTWISE,
        "0.5 r^2 / beta if |r| < beta else |r| - 0.5 beta, r = p - y; |r| for beta = 0",
        "PyTorch SmoothL1Loss", _VALUES, _SAME_VALUES, params=(BETA,),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="1 / beta for |r| <= beta (the quadratic side at the boundary), 0 outside "
                "and for beta = 0",
    ),
    LossSpec(
        "log_cosh", Layout.ELEMENTWISE, "log cosh(p - y); gradient tanh(p - y)",
        "Keras LogCosh (per element)", _VALUES, _SAME_VALUES,
        hessian_modes=ALL_HESSIAN_MODES, hessian="sech^2 r = 1 - tanh^2 r, in (0, 1]",
    ),
    LossSpec(
        "quantile", Layout.ELEMENTWISE,
        "pinball loss tau max(y - p, 0) + (1 - tau) max(p - y, 0); gradient 0 at p = y",
        "scikit-learn mean_pinball_loss", _VALUES, _SAME_VALUES, params=(QUANTILE,),
        aliases=("pinball",),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="0 (piecewise linear); GBMs run it with a constant h = 1 (LightGBM "
                "quantile, XGBoost reg:quantileerror)",
    ),
    LossSpec(
        "mape", Layout.ELEMENTWISE,
        "100 |p - y| / max(|y|, 1e-7): a percentage",
        "Keras MeanAbsolutePercentageError (per element)", _VALUES, _SAME_VALUES,
        hessian_modes=ALL_HESSIAN_MODES, hessian="0 (piecewise linear)",
    ),
    LossSpec(
        "msle", Layout.ELEMENTWISE,
        "(log1p(max(p, 1e-7)) - log1p(max(y, 1e-7)))^2; gradient 0 where p <= 1e-7",
        "Keras MeanSquaredLogarithmicError (per element)", _VALUES, _SAME_VALUES,
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="2 (1 - d) / (1 + p)^2, d = log1p(p) - log1p(y), where p > 1e-7 (negative "
                "where 1 + p > e (1 + y): not convex; XGBoost floors it at 1e-6), 0 where "
                "the clamp is active",
    ),
    LossSpec(
        "poisson_nll", Layout.ELEMENTWISE,
        "e^p - y p for log-rates (log_input), p - y log(p + 1e-8) for rates p >= 0; "
        "full adds y log y - y + 0.5 log(2 pi y) where y > 1",
        "PyTorch PoissonNLLLoss",
        InputSpec(InputKind.LOG_RATES, FLOAT_DTYPES,
                  "log-rates log mu, or rates mu >= 0 when log_input=false; any shape"),
        InputSpec(InputKind.VALUES, FLOAT_DTYPES + INDEX_DTYPES,
                  "observed counts y, same shape as predictions (integers are converted)"),
        params=(LOG_INPUT, FULL),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="e^p for log-rates (XGBoost count:poisson adds max_delta_step 0.7 to p); "
                "y / (p + 1e-8)^2 for rates",
    ),
    LossSpec(
        "tweedie", Layout.ELEMENTWISE,
        "Tweedie unit deviance of the mean mu = p > 0 with power p; 0: (y - mu)^2, "
        "1: 2 (y log(y / mu) - y + mu), 2: 2 (log(mu / y) + y / mu - 1)",
        "scikit-learn mean_tweedie_deviance",
        InputSpec(InputKind.RATES, FLOAT_DTYPES,
                  "means mu > 0 (any real for power 0), any shape"),
        InputSpec(InputKind.VALUES, FLOAT_DTYPES + INDEX_DTYPES,
                  "targets, same shape as predictions: y >= 0 for 1 <= power < 2, y > 0 for "
                  "power >= 2, any real for power <= 0"),
        params=(POWER,),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="2 mu^-p ((1 - p) + p y / mu) (power 0: 2; 1: 2 y / mu^2; 2: "
                "2 (2 y - mu) / mu^3): negative in places outside 1 <= p <= 2",
    ),
    LossSpec(
        "gaussian_nll", Layout.ELEMENTWISE,
        "0.5 (log v + (p - y)^2 / v), v = max(variance, 1e-6); full adds 0.5 log(2 pi); "
        "ComputeGradient also returns the gradient w.r.t. the variance",
        "PyTorch GaussianNLLLoss",
        _VALUES, _SAME_VALUES, params=(FULL,),
        variance=InputSpec(
            InputKind.VARIANCES, FLOAT_DTYPES,
            "variances >= 0: the predictions' shape, that shape with the last axis 1, or "
            "without the last axis (shared along it); converted to the predictions' dtype"),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="w.r.t. the predictions (the mean): 1 / v, v = max(variance, 1e-6) (none "
                "w.r.t. the variance)",
    ),
    LossSpec(
        "sigmoid_focal", Layout.ELEMENTWISE,
        "alpha_t (1 - p_t)^gamma BCE_with_logits(p, y), p_t = sigmoid(p) for y = 1",
        "torchvision ops.sigmoid_focal_loss",
        InputSpec(InputKind.LOGITS, FLOAT_DTYPES, "logits, any shape"),
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES + INDEX_DTYPES,
                  "labels in [0, 1] (0/1, or soft), same shape as predictions"),
        params=(FOCAL_ALPHA, GAMMA),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="alpha_t [BCE (g (g-1) (1-2y)^2 u^(g-2) s^2 + g (1-2y)(1-2p) u^(g-1) s) "
                "+ 2 g (1-2y)(p-y) u^(g-1) s + u^g s], g = gamma, u = 1 - p_t, s = p (1-p); "
                "terms with u^(g-1), u^(g-2) are 0 at u = 0 (their limit); gamma 0: alpha_t "
                "s (weighted BCE); negative for some inputs when gamma > 0 (not convex): "
                "clipped floors it",
    ),
    LossSpec(
        "softmax_focal", Layout.DENSE_ROWS,
        "-alpha sum_k q_k (1 - p_k)^gamma log p_k, p = softmax over the last axis",
        "Keras CategoricalFocalCrossentropy (from_logits=True) without the 1e-7 clip",
        InputSpec(InputKind.LOGITS, FLOAT_DTYPES, "logits, shape (..., C), C on the last axis"),
        InputSpec(InputKind.PROBABILITIES, FLOAT_DTYPES,
                  "probability rows in [0, 1] (one-hot or soft), same shape as predictions"),
        params=(SOFTMAX_FOCAL_ALPHA, GAMMA),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="the diagonal w.r.t. the logits: with f_k(p) = -alpha q_k (1-p)^gamma log p, "
                "v_k = p_k f_k'(p_k), u_k = p_k^2 f_k''(p_k): (1 - 2 p_j)(v_j - p_j sum v) "
                "+ (1 - p_j)^2 u_j + p_j^2 sum_{k != j} u_k (bounded as p_j -> 1); gamma 0: "
                "alpha (sum q) p_j (1 - p_j); negative for some inputs when gamma > 0",
    ),
    LossSpec(
        "nll", Layout.SPARSE_ROWS,
        "-w_y lp_y for log-probabilities lp and integer class targets; optional label "
        "smoothing as sparse_categorical_cross_entropy",
        "PyTorch NLLLoss",
        InputSpec(InputKind.LOG_PROBABILITIES, FLOAT_DTYPES,
                  "log-probabilities (e.g. log_softmax output), shape (..., C), C on the last "
                  "axis"),
        _CLASS_TARGETS,
        params=(IGNORE_INDEX, CLASS_WEIGHT, SMOOTHING),
        hessian_modes=ALL_HESSIAN_MODES, hessian="0 (linear in the log-probabilities)",
    ),
    LossSpec(
        "multiclass_hinge", Layout.SPARSE_ROWS,
        "w_y max(0, 1 + max_{k != y} s_k - s_y) (Crammer-Singer) for integer class targets",
        "optax multiclass_hinge_loss; scikit-learn hinge_loss (multiclass)",
        InputSpec(InputKind.SCORES, FLOAT_DTYPES, "scores, shape (..., C), C on the last axis"),
        _CLASS_TARGETS,
        params=(IGNORE_INDEX, CLASS_WEIGHT),
        hessian_modes=ALL_HESSIAN_MODES, hessian="0 (piecewise linear)",
    ),
    LossSpec(
        "categorical_hinge", Layout.DENSE_ROWS,
        "max(0, max_k (1 - y_k) s_k - sum_k y_k s_k + 1) over the last axis",
        "Keras CategoricalHinge",
        InputSpec(InputKind.SCORES, FLOAT_DTYPES, "scores, shape (..., C), C on the last axis"),
        InputSpec(InputKind.VALUES, FLOAT_DTYPES + INDEX_DTYPES,
                  "one-hot rows (or any real values), same shape as predictions"),
        hessian_modes=ALL_HESSIAN_MODES, hessian="0 (piecewise linear)",
    ),
    LossSpec(
        "cosine_similarity", Layout.DENSE_ROWS,
        "-cos(p, y) over the last axis, each norm floored at 1e-7 (a zero vector gives 0)",
        "Keras CosineSimilarity",
        InputSpec(InputKind.VALUES, FLOAT_DTYPES, "vectors, shape (..., D), D on the last axis"),
        InputSpec(InputKind.VALUES, FLOAT_DTYPES + INDEX_DTYPES,
                  "vectors, same shape as predictions"),
        hessian_modes=ALL_HESSIAN_MODES,
        hessian="diagonal of the dense Hessian of -x.u / |x|, u = y / |y|: "
                "2 u_k x_k / n^3 + (x.u)(1 / n^3 - 3 x_k^2 / n^5), n = |x|; 0 at the norm floor",
    ),
)

_BY_NAME: dict[str, LossSpec] = {}
for _spec in LOSSES:
    for _name in (_spec.name, *_spec.aliases):
        _BY_NAME[_name] = _spec


_PLUGIN_LOSSES: list[LossSpec] = []


def all_losses() -> tuple[LossSpec, ...]:
    """The built-in losses, then those that plugins registered (see ``lossgrad.plugin``)."""
    return LOSSES + tuple(_PLUGIN_LOSSES)


def taken_names() -> frozenset[str]:
    """Every name and alias in use, built-in or registered."""
    return frozenset(_BY_NAME)


def register(spec: LossSpec) -> None:
    """Add a plugin loss. Its name and aliases must all be new (ValueError otherwise):
    a plugin can add losses, never replace one."""
    names = (spec.name, *spec.aliases)
    taken = [name for name in names if name in _BY_NAME]
    if taken:
        owners = {_describe(_BY_NAME[name]) for name in taken}
        raise ValueError(f"{', '.join(map(repr, taken))} already taken by "
                         + ", ".join(sorted(owners)))
    _PLUGIN_LOSSES.append(spec)
    for name in names:
        _BY_NAME[name] = spec


def _describe(spec: LossSpec) -> str:
    if spec.plugin is None:
        return f"the built-in loss {spec.name!r}"
    return f"the plugin loss {spec.name!r} ({spec.plugin.entry_point})"


def lookup(name: str) -> LossSpec:
    """Return the spec for a loss name or alias; raise UNKNOWN_LOSS otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise InvalidArgumentError(
            "loss", f"unknown loss {name!r}; known losses: {known}", UNKNOWN_LOSS
        ) from None
