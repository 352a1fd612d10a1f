"""Request building and response reading shared by LossClient and AsyncLossClient.

Both clients turn their arguments into a :class:`ComputeRequest` with :func:`compute_request`,
send it, and read the bytes that come back with :func:`loss_result` or
:func:`gradient_result`; only the sending differs (blocking or awaited).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from ._convert import from_tensor, to_tensor
from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._types import GradientResult, InputInfo, LossInfo, LossResult, ParamInfo, PluginInfo
from ._wire import ComputeRequest, ComputeResponse, Tensor, WireError, parse_response
from .errors import InternalError, InvalidArgumentError

_REDUCTIONS: dict[str, pb.Reduction.ValueType] = {
    "none": pb.REDUCTION_NONE,
    "sum": pb.REDUCTION_SUM,
    "mean": pb.REDUCTION_MEAN,
}
_HESSIAN_MODES: dict[str, pb.HessianMode.ValueType] = {
    "exact": pb.HESSIAN_MODE_EXACT,
    "clipped": pb.HESSIAN_MODE_CLIPPED,
    "constant": pb.HESSIAN_MODE_CONSTANT,
}
# LossParams typed fields by name; other keyword parameters of compute_loss and
# compute_gradient (those of plugin losses) travel in the by_name map.
_PARAM_FIELDS: dict[str, FieldDescriptor] = {
    name: field for name, field in pb.LossParams.DESCRIPTOR.fields_by_name.items()
    if name != "by_name"
}

LIST_LOSSES_REQUEST = pb.ListLossesRequest()


Reader = Callable[[Tensor | None, str], np.ndarray[Any, Any]]


def loss_result(data: bytes, request: ComputeRequest, read: Reader = from_tensor) -> LossResult:
    """Read a ComputeLoss response (its unparsed bytes); ``read`` reads its tensors."""
    response = _parse(data)
    return LossResult(
        loss=_loss_value(response, request.reduction, read),
        positions=response.positions,
        positions_counted=response.positions_counted,
        weight_sum=response.weight_sum,
    )


def gradient_result(data: bytes, request: ComputeRequest,
                    read: Reader = from_tensor) -> GradientResult:
    """Read a ComputeGradient response (its unparsed bytes); the gradient views them
    (or is where ``read`` puts it)."""
    response = _parse(data)
    if request.hessian and response.hessian is None:
        raise InternalError("the server returned no hessian; it may predate Hessians "
                            "(GetServerInfo features.hessian)", field="hessian")
    return GradientResult(
        loss=_loss_value(response, request.reduction, read),
        gradient=read(response.gradient, "gradient"),
        positions=response.positions,
        positions_counted=response.positions_counted,
        weight_sum=response.weight_sum,
        hessian=None if response.hessian is None else from_tensor(response.hessian, "hessian"),
        variance_gradient=(None if response.variance_gradient is None else
                           from_tensor(response.variance_gradient, "variance_gradient")),
    )


def loss_infos(response: pb.ListLossesResponse) -> list[LossInfo]:
    """Read a ListLosses response."""
    return [_loss_info(info) for info in response.losses]


def _parse(data: bytes) -> ComputeResponse:
    # Bytes come back unparsed, so that a malformed response is an InternalError that
    # says what is wrong (a deserializer that raises gives a bare RpcError).
    try:
        return parse_response(data)
    except WireError as err:
        raise InternalError(f"malformed response from the server: {err}",
                            field=err.field) from err


def compute_request(
    loss: str,
    predictions: Any,
    targets: Any,
    reduction: str,
    sample_weight: Any,
    allow_nonfinite: bool,
    params: Mapping[str, Any],
) -> ComputeRequest:
    """The fields that ComputeLossRequest and ComputeGradientRequest share; the tensors
    view the arrays (the one copy is into the message). A ``variance`` keyword among
    ``params`` is the variance tensor of gaussian_nll, not a LossParams field."""
    params = dict(params)
    variance = params.pop("variance", None)
    if not isinstance(loss, str):
        raise InvalidArgumentError(
            f"loss: expected a loss name, got {type(loss).__name__}", field="loss")
    code = _reduction(reduction)
    loss_params = None
    if params:  # most calls have none: no message to build
        loss_params = pb.LossParams()
        _set_params(loss_params, params)
    return ComputeRequest(
        loss=loss,
        reduction=code,
        allow_nonfinite=bool(allow_nonfinite),
        params=loss_params if loss_params is not None and loss_params.ListFields() else None,
        predictions=to_tensor(predictions, "predictions"),
        targets=to_tensor(targets, "targets"),
        sample_weight=None if sample_weight is None else to_tensor(sample_weight,
                                                                   "sample_weight"),
        variance=None if variance is None else to_tensor(variance, "variance"),
    )


def with_hessian(request: ComputeRequest, hessian: str | None, floor: float | None,
                 constant: float | None) -> ComputeRequest:
    """``request`` with ComputeGradientRequest's Hessian fields: ``hessian`` is None (no
    Hessian), "exact", "clipped" or "constant"; ``floor`` and ``constant`` are sent when
    not None (the server checks that they fit the mode and the loss)."""
    if hessian is None and floor is None and constant is None:
        return request
    code = 0
    if hessian is not None:
        found = _HESSIAN_MODES.get(hessian.lower()) if isinstance(hessian, str) else None
        if found is None:
            raise InvalidArgumentError(
                f"hessian: unknown Hessian mode {hessian!r}; expected None or one of "
                + ", ".join(repr(name) for name in _HESSIAN_MODES),
                reason="UNKNOWN_HESSIAN_MODE", field="hessian")
        code = found
    return dataclasses.replace(request, hessian=code,
                               hessian_floor=_optional_number(floor, "hessian_floor"),
                               hessian_constant=_optional_number(constant, "hessian_constant"))


def _optional_number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise _type_error(field, "a number", value)
    return float(value)


def _reduction(value: str) -> pb.Reduction.ValueType:
    code = _REDUCTIONS.get(value.lower()) if isinstance(value, str) else None
    if code is None:
        raise InvalidArgumentError(
            f"reduction: unknown reduction {value!r}; expected one of "
            + ", ".join(repr(name) for name in _REDUCTIONS),
            reason="UNKNOWN_REDUCTION", field="reduction")
    return code


def _set_params(out: pb.LossParams, params: Mapping[str, Any]) -> None:
    """Set each keyword on the LossParams field of the same name, or in ``by_name`` when
    there is no such field (the server checks that the loss has the parameter); None
    leaves it unset."""
    for name, value in params.items():
        if value is None:
            continue
        field = f"params.{name}"
        descriptor = _PARAM_FIELDS.get(name)
        if descriptor is None:
            _set_by_name(out.by_name[name], value, field)
        elif descriptor.is_repeated:
            getattr(out, name).extend(_double_list(value, field))
        elif descriptor.type == FieldDescriptor.TYPE_BOOL:
            if not isinstance(value, (bool, np.bool_)):
                raise _type_error(field, "a bool", value)
            setattr(out, name, bool(value))
        elif descriptor.type == FieldDescriptor.TYPE_INT64:
            if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
                raise _type_error(field, "an int", value)
            if not -(2**63) <= int(value) < 2**63:
                raise InvalidArgumentError(f"{field}: {value} is outside int64",
                                           reason="PARAMETER_OUT_OF_RANGE", field=field)
            setattr(out, name, int(value))
        else:  # TYPE_DOUBLE
            if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
                raise _type_error(field, "a number", value)
            setattr(out, name, float(value))


def _set_by_name(out: pb.ParamValue, value: Any, field: str) -> None:
    """A plugin parameter, typed by its Python type (the server converts an int for a
    double parameter)."""
    if isinstance(value, (bool, np.bool_)):
        out.bool_value = bool(value)
    elif isinstance(value, numbers.Integral):
        if not -(2**63) <= int(value) < 2**63:
            raise InvalidArgumentError(f"{field}: {value} is outside int64",
                                       reason="PARAMETER_OUT_OF_RANGE", field=field)
        out.int64_value = int(value)
    elif isinstance(value, numbers.Real):
        out.double_value = float(value)
    else:
        out.double_list_value.values.extend(_double_list(value, field))


def _double_list(value: Any, field: str) -> list[float]:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _type_error(field, "a sequence of numbers", value) from err
    if array.ndim != 1:
        raise _type_error(field, "a 1-D sequence of numbers", value)
    values: list[float] = array.tolist()
    return values


def _type_error(field: str, expected: str, value: object) -> InvalidArgumentError:
    return InvalidArgumentError(f"{field}: expected {expected}, got {type(value).__name__}",
                                reason="INVALID_ARGUMENT", field=field)


def _loss_value(response: ComputeResponse, reduction: int,
                read: Reader) -> float | np.ndarray[Any, Any]:
    if reduction == pb.REDUCTION_NONE:
        return read(response.losses, "losses")
    return float(response.loss)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:  # a value newer than this client
        return f"unknown_{value}"
    return name.removeprefix(prefix).lower()


def _input_info(spec: pb.InputSpec) -> InputInfo:
    return InputInfo(
        kind=_enum_name(pb.InputKind, spec.kind, "INPUT_KIND_"),
        dtypes=tuple(_enum_name(pb.DataType, d, "DATA_TYPE_") for d in spec.dtypes),
        description=spec.description,
    )


def _param_info(info: pb.ParamInfo) -> ParamInfo:
    default: float | bool | int | None = None
    if not info.optional:
        if info.type == pb.PARAM_TYPE_DOUBLE:
            default = info.default_double
        elif info.type == pb.PARAM_TYPE_BOOL:
            default = info.default_bool
        elif info.type == pb.PARAM_TYPE_INT64:
            default = info.default_int64
    return ParamInfo(
        name=info.name,
        type=_enum_name(pb.ParamType, info.type, "PARAM_TYPE_"),
        default=default,
        optional=info.optional,
        minimum=info.minimum if info.HasField("minimum") else None,
        minimum_inclusive=info.minimum_inclusive,
        maximum=info.maximum if info.HasField("maximum") else None,
        maximum_inclusive=info.maximum_inclusive,
        description=info.description,
    )


def _loss_info(info: pb.LossInfo) -> LossInfo:
    return LossInfo(
        name=info.name,
        aliases=tuple(info.aliases),
        description=info.description,
        predictions=_input_info(info.predictions),
        targets=_input_info(info.targets),
        params=tuple(_param_info(p) for p in info.params),
        class_axis_last=info.class_axis_last,
        reference=info.reference,
        hessian_modes=tuple(_enum_name(pb.HessianMode, m, "HESSIAN_MODE_")
                            for m in info.hessian_modes),
        hessian=info.hessian,
        origin=_enum_name(pb.LossOrigin, info.origin, "LOSS_ORIGIN_"),
        plugin=PluginInfo(info.plugin.entry_point, info.plugin.distribution,
                          info.plugin.version) if info.HasField("plugin") else None,
        variance=_input_info(info.variance) if info.HasField("variance") else None,
        alias_params={alias: _params_dict(params)
                      for alias, params in info.alias_params.items()},
    )


def _params_dict(params: pb.LossParams) -> dict[str, Any]:
    """The fields of ``params`` that are set, by name (``by_name`` entries included)."""
    out: dict[str, Any] = {
        descriptor.name: list(value) if descriptor.is_repeated else value
        for descriptor, value in params.ListFields() if descriptor.name != "by_name"}
    for name, value in params.by_name.items():
        kind = value.WhichOneof("value")
        if kind is not None:
            item = getattr(value, kind)
            out[name] = list(item.values) if kind == "double_list_value" else item
    return out

