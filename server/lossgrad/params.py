"""Validation of a request's options: the loss's parameters, the reduction and the
Hessian fields, each refused with an ``InvalidArgumentError`` naming the field."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import catalog
from .catalog import HessianMode, LossSpec, ParamType
from .errors import (
    HESSIAN_NOT_SUPPORTED,
    PARAMETER_OUT_OF_RANGE,
    UNKNOWN_HESSIAN_MODE,
    UNKNOWN_PARAMETER,
    UNKNOWN_REDUCTION,
    InvalidArgumentError,
)

DEFAULT_HESSIAN_FLOOR = 1e-16  # XGBoost's floor for its logistic and softmax Hessians
DEFAULT_HESSIAN_CONSTANT = 1.0


class Reduction(enum.Enum):
    NONE = "none"
    SUM = "sum"
    MEAN = "mean"


def resolve_params(spec: LossSpec, name: str, given: dict[str, Any]) -> dict[str, Any]:
    preset = spec.alias_presets.get(name, {})
    values: dict[str, Any] = {p.name: p.default for p in spec.params}
    values.update(preset)
    for key, value in given.items():
        field = f"params.{key}"
        p = spec.param(key)
        if p is None:
            accepted = ", ".join(q.name for q in spec.params) or "none"
            raise InvalidArgumentError(
                field, f"not a parameter of loss {name!r} (its parameters: {accepted})",
                UNKNOWN_PARAMETER)
        if value is None:
            continue
        value = coerce_param(p, field, value)
        if key in preset and value != preset[key]:
            raise InvalidArgumentError(
                field, f"{name!r} means {key}={preset[key]}; use {spec.name!r} for {key}={value}",
                PARAMETER_OUT_OF_RANGE)
        values[key] = value
    return values


def coerce_param(p: catalog.ParamSpec, field: str, value: Any) -> Any:
    """``value`` as parameter ``p`` takes it; InvalidArgumentError on ``field`` when its
    type or range is wrong."""
    if p.type is ParamType.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentError(field, f"must be a bool, got {value!r}",
                                       PARAMETER_OUT_OF_RANGE)
        return bool(value)
    if p.type is ParamType.INT64:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(field, f"must be an integer, got {value!r}",
                                       PARAMETER_OUT_OF_RANGE)
        return int(value)
    if p.type is ParamType.DOUBLE_LIST:
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 1:
            raise InvalidArgumentError(field, "must be a list of numbers", PARAMETER_OUT_OF_RANGE)
        for k, v in enumerate(arr.tolist()):
            _check_range(p, f"{field}[{k}]", v)
        return np.ascontiguousarray(arr)
    try:
        if isinstance(value, (bool, np.bool_)):  # float(True) would pass as 1.0
            raise TypeError(value)
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(field, f"must be a number, got {value!r}",
                                   PARAMETER_OUT_OF_RANGE) from None
    _check_range(p, field, number)
    return number


def _check_range(p: catalog.ParamSpec, field: str, v: float) -> None:
    low_ok = p.minimum is None or v > p.minimum or (p.minimum_inclusive and v == p.minimum)
    high_ok = p.maximum is None or v < p.maximum or (p.maximum_inclusive and v == p.maximum)
    if math.isfinite(v) and low_ok and high_ok:
        return
    lo = "(-inf" if p.minimum is None else ("[" if p.minimum_inclusive else "(") + f"{p.minimum:g}"
    hi = "inf)" if p.maximum is None else f"{p.maximum:g}" + ("]" if p.maximum_inclusive else ")")
    raise InvalidArgumentError(field, f"{v!r} is outside {lo}, {hi}", PARAMETER_OUT_OF_RANGE)


_REDUCTIONS = {r.value: r for r in Reduction}  # a dict lookup is a tenth of Reduction(...)


def reduction_of(value: Reduction | str) -> Reduction:
    if isinstance(value, Reduction):
        return value
    reduction = _REDUCTIONS.get(str(value).lower())
    if reduction is None:
        raise InvalidArgumentError(
            "reduction", f"unknown reduction {value!r}; use none, sum or mean",
            UNKNOWN_REDUCTION)
    return reduction


@dataclass(frozen=True)
class HessianRequest:
    """A validated Hessian request: the mode, and the bounds [lo, hi] the kernels clip
    each position's second derivative to (exact: unbounded; clipped: [floor, inf];
    constant: [c, c])."""

    mode: HessianMode
    bounds: np.ndarray  # float64 [lo, hi]


def hessian_request(spec: LossSpec, mode: HessianMode | str | None, floor: Any,
                    constant: Any) -> HessianRequest | None:
    """Validate the Hessian fields of a request; None when no Hessian is wanted."""
    if mode is None and floor is None and constant is None:
        return None
    if mode is not None and not isinstance(mode, HessianMode):
        try:
            mode = HessianMode(str(mode).lower())
        except ValueError:
            raise InvalidArgumentError(
                "hessian", f"unknown Hessian mode {mode!r}; use exact, clipped or constant",
                UNKNOWN_HESSIAN_MODE) from None
    for name, value, owner in (("hessian_floor", floor, HessianMode.CLIPPED),
                               ("hessian_constant", constant, HessianMode.CONSTANT)):
        if value is not None and mode is not owner:
            shown = "not set" if mode is None else mode.value
            raise InvalidArgumentError(
                name, f"applies to hessian={owner.value} only (hessian is {shown})",
                UNKNOWN_PARAMETER)
    if mode is None:
        return None
    if mode not in spec.hessian_modes:
        modes = ", ".join(m.value for m in spec.hessian_modes) or "none"
        raise InvalidArgumentError(
            "hessian", f"loss {spec.name!r} has no {mode.value} Hessian (its modes: {modes})",
            HESSIAN_NOT_SUPPORTED)
    if mode is HessianMode.CLIPPED:
        lo = _hessian_bound("hessian_floor", floor, DEFAULT_HESSIAN_FLOOR, 0.0, True)
        return HessianRequest(mode, np.array([lo, math.inf]))
    if mode is HessianMode.CONSTANT:
        c = _hessian_bound("hessian_constant", constant, DEFAULT_HESSIAN_CONSTANT, 0.0, False)
        return HessianRequest(mode, np.array([c, c]))
    return HessianRequest(mode, np.array([-math.inf, math.inf]))


def _hessian_bound(field: str, value: Any, default: float, minimum: float,
                   inclusive: bool) -> float:
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(field, f"must be a number, got {value!r}",
                                   PARAMETER_OUT_OF_RANGE)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(field, f"must be a number, got {value!r}",
                                   PARAMETER_OUT_OF_RANGE) from None
    if not (math.isfinite(number) and (number > minimum or (inclusive and number == minimum))):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise InvalidArgumentError(field, f"{number!r} must be finite and {bound}",
                                   PARAMETER_OUT_OF_RANGE)
    return number
