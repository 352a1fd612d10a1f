"""Plain result and catalog types of the client (no protobuf types)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt


@dataclass(frozen=True)
class LossResult:
    """What :meth:`LossClient.compute_loss` returns.

    ``loss`` is a float for reductions "sum" and "mean", and for "none" a read-only
    array of the weighted per-position losses in the predictions' dtype (copy it to
    write to it). ``positions`` counts the positions of the request,
    ``positions_counted`` those with non-zero weight, and ``weight_sum`` is the
    divisor of "mean".
    """

    loss: float | npt.NDArray[Any]
    positions: int
    positions_counted: int
    weight_sum: float


@dataclass(frozen=True)
class GradientResult:
    """What :meth:`LossClient.compute_gradient` returns: :class:`LossResult`'s fields and
    ``gradient``, a read-only array with the predictions' shape and dtype; ``hessian``,
    the diagonal Hessian the call asked for (same shape, dtype, weights and scale as the
    gradient), or None when it asked for none; ``variance_gradient``, the gradient w.r.t.
    the variance (gaussian_nll, in the variance's shape), else None."""

    loss: float | npt.NDArray[Any]
    gradient: npt.NDArray[Any]
    positions: int
    positions_counted: int
    weight_sum: float
    hessian: npt.NDArray[Any] | None = None
    variance_gradient: npt.NDArray[Any] | None = None


@dataclass(frozen=True)
class InputInfo:
    """One input tensor of a loss: ``kind`` such as "probabilities" or "class_indices",
    the accepted ``dtypes`` ("float32", ...) and the shape and value rules in words."""

    kind: str
    dtypes: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class ParamInfo:
    """One loss parameter, a keyword of ``compute_loss``/``compute_gradient``.

    ``type`` is "double", "bool", "int64" or "double_list". ``default`` is None when
    ``optional`` (the feature is off unless set). ``minimum``/``maximum`` bound the
    value (each entry of a list) when not None; the ``*_inclusive`` flags say whether
    the bound itself is allowed.
    """

    name: str
    type: str
    default: float | bool | int | None
    optional: bool
    minimum: float | None
    minimum_inclusive: bool
    maximum: float | None
    maximum_inclusive: bool
    description: str


@dataclass(frozen=True)
class PluginInfo:
    """The installed package behind a plugin loss: its entry point in the
    ``lossgrad.losses`` group ("name = module:attribute"), distribution and version."""

    entry_point: str
    distribution: str
    version: str


@dataclass(frozen=True)
class LossInfo:
    """One loss of the server's catalog. ``hessian_modes`` are the ``hessian=`` values
    :meth:`LossClient.compute_gradient` accepts for it ("exact", "clipped", "constant";
    empty: none), and ``hessian`` says what its exact diagonal Hessian is. ``origin`` is
    "builtin", "plugin" (then ``plugin`` says which package provides it) or "unspecified"
    (an older server). ``alias_params`` gives the parameter values an alias fixes, by
    alias (``{"sigmoid_cross_entropy": {"from_logits": True}}``)."""

    name: str
    aliases: tuple[str, ...]
    description: str
    predictions: InputInfo
    targets: InputInfo
    params: tuple[ParamInfo, ...]
    class_axis_last: bool
    reference: str
    hessian_modes: tuple[str, ...] = ()
    hessian: str = ""
    origin: str = "unspecified"
    plugin: PluginInfo | None = None
    variance: InputInfo | None = None  # the third input, for losses that take one
    alias_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def param(self, name: str) -> ParamInfo | None:
        """Return the parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)
