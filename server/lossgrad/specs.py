"""The types of the catalog's entries (a loss, its inputs, its parameters) and the
conventions every entry follows. The entries themselves are in :mod:`lossgrad.catalog`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InputKind(enum.Enum):
    VALUES = "values"
    PROBABILITIES = "probabilities"
    LOGITS = "logits"
    LOG_PROBABILITIES = "log_probabilities"
    CLASS_INDICES = "class_indices"
    SIGNED_LABELS = "signed_labels"
    SCORES = "scores"
    RATES = "rates"
    LOG_RATES = "log_rates"
    VARIANCES = "variances"


class ParamType(enum.Enum):
    DOUBLE = "double"
    BOOL = "bool"
    INT64 = "int64"
    DOUBLE_LIST = "double_list"


class HessianMode(enum.Enum):
    """Which diagonal Hessian ComputeGradient returns (none when not asked for)."""

    EXACT = "exact"  # the diagonal of the exact second derivative
    CLIPPED = "clipped"  # max(exact, floor): positive, for Newton steps
    CONSTANT = "constant"  # a constant per position, for losses whose Hessian is 0


ALL_HESSIAN_MODES = tuple(HessianMode)


class Layout(enum.Enum):
    """How the engine views the tensors; a position is an element or a row."""

    ELEMENTWISE = "elementwise"  # targets: same shape as predictions
    DENSE_ROWS = "dense_rows"  # targets: same shape, class axis last
    SPARSE_ROWS = "sparse_rows"  # targets: class indices, shape without the class axis


FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class InputSpec:
    kind: InputKind
    dtypes: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    default: float | bool | int | None
    description: str
    minimum: float | None = None
    minimum_inclusive: bool = True
    maximum: float | None = None
    maximum_inclusive: bool = True

    @property
    def optional(self) -> bool:
        """True when the parameter has no default: unset means the feature is off."""
        return self.default is None


@dataclass(frozen=True)
class PluginSource:
    """The installed package behind a plugin loss: its entry point in the
    ``lossgrad.losses`` group (``"name = module:attribute"``), distribution and version."""

    entry_point: str
    distribution: str
    version: str


@dataclass(frozen=True)
class LossSpec:
    name: str
    layout: Layout
    description: str
    reference: str
    predictions: InputSpec
    targets: InputSpec
    params: tuple[ParamSpec, ...] = ()
    aliases: tuple[str, ...] = ()
    # alias -> parameter values the alias fixes (a request may not set others).
    alias_presets: dict[str, dict[str, object]] = field(default_factory=dict)
    # The Hessian modes the loss supports (none: a Hessian request is refused), and what
    # its exact diagonal Hessian is, in words.
    hessian_modes: tuple[HessianMode, ...] = ()
    hessian: str = ""
    plugin: PluginSource | None = None  # None: a built-in loss
    # A third input of the predictions' shape, where the loss takes one (gaussian_nll).
    variance: InputSpec | None = None

    @property
    def class_axis_last(self) -> bool:
        return self.layout is not Layout.ELEMENTWISE

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


CONVENTIONS = """\
Argument order is (predictions, targets), as in PyTorch and optax.
A position is one element for elementwise losses and one row along the last axis (the
class axis) for the losses whose class_axis_last is true. Predictions need >= 1 dimension
(>= 2 for the class losses), none of size 0.
Weights: w_i = sample_weight_i (shape (N,) for the batch axis, or the per-position shape;
finite, >= 0) x class_weight[target_i] (losses with class indices), and 0 where the
target is ignore_index.
Reductions: NONE returns w_i * l_i per position; SUM returns sum(w_i * l_i); MEAN (the
default) returns sum(w_i * l_i) / sum(w_i). Unweighted MEAN equals PyTorch's 'mean' (for
kl_divergence, 'batchmean' on 2-D input). If every weight is 0 the loss and the gradient
are 0; responses carry positions_counted and weight_sum.
rmse is the square root of mse under the same reduction and weights.
Clamps follow PyTorch: logs of probability inputs are floored at -100; logits use stable
softplus / log-sum-exp forms. Label smoothing: (1 - eps) q + eps / C for class rows,
PyTorch's two-term mixture for class indices, y (1 - eps) + eps / 2 for
binary_cross_entropy (Keras).
Gradients are of exactly the value returned, w.r.t. the predictions (with NONE, of the sum
of the per-position values); where a clamp is active its term contributes 0; the
subgradient at kinks is 0. Float32 gradients of probability inputs saturate at the
largest float32 instead of overflowing.
Predictions are float32 or float64; per-position values and the gradient come back in
the predictions' dtype; float targets are converted to it. float16 and bfloat16 inputs
are widened to float32 (exactly) and computed as float32; per-position values and the
gradient are rounded back to the predictions' half type (to nearest, ties to even).
Element math runs in the predictions' type, every sum in float64 over fixed blocks in a
fixed order: the same inputs always give the same bits (also through ComputeStream).
NaN/Inf inputs are rejected unless allow_nonfinite is set, and so are values outside a
loss's domain (negative Poisson rates, non-positive Tweedie means, negative variances).
gaussian_nll takes a third tensor, the variance (ComputeGradient also returns its
gradient); poisson_nll, tweedie, gaussian_nll and msle compute in float64 whatever the
input type, since their terms cancel near the minimum.
Hessians (ComputeGradient with hessian set; LossInfo lists each loss's modes): the
diagonal of d^2 L / d x^2 with the gradient's weights and scale: scale * s_i *
clip(h_i), h_i the second derivative of the position's loss (its class weights
included), s_i the sample weight (0 for ignored positions). exact: h_i itself; clipped:
max(h_i, hessian_floor), default 1e-16; constant: hessian_constant, default 1.
"""
