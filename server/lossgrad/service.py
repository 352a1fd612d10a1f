"""The LossService servicer: convert the request, call the engine, convert the result."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

from . import catalog, engine, wire
from .status import abort

_KINDS = {kind: pb.InputKind.Value(f"INPUT_KIND_{kind.name}") for kind in catalog.InputKind}
_PARAM_TYPES = {t: pb.ParamType.Value(f"PARAM_TYPE_{t.name}") for t in catalog.ParamType}
_DTYPES = {name: wire.data_type(np.dtype(name)) for name in ("float32", "float64", "int32",
                                                              "int64")}


class LossService(pb_grpc.LossServiceServicer):
    """Thin servicer over :func:`lossgrad.engine.compute` and :data:`lossgrad.catalog.LOSSES`."""

    def __init__(self) -> None:
        self._catalog = list_losses_response(catalog.LOSSES)

    def ComputeLoss(
        self, request: pb.ComputeLossRequest, context: grpc.ServicerContext
    ) -> pb.ComputeLossResponse:
        response = pb.ComputeLossResponse()
        try:
            _compute(request, response, gradient=False)
        except Exception as err:
            abort(context, err, "ComputeLoss")
        return response

    def ComputeGradient(
        self, request: pb.ComputeGradientRequest, context: grpc.ServicerContext
    ) -> pb.ComputeGradientResponse:
        response = pb.ComputeGradientResponse()
        try:
            _compute(request, response, gradient=True)
        except Exception as err:
            abort(context, err, "ComputeGradient")
        return response

    def ListLosses(
        self, request: pb.ListLossesRequest, context: grpc.ServicerContext
    ) -> pb.ListLossesResponse:
        return self._catalog  # built once; never mutated, so safe to share between calls


def _compute(request: Any, response: Any, *, gradient: bool) -> None:
    """Run one Compute* request into ``response`` (the two RPCs differ only in ``gradient``)."""
    result = engine.compute(
        request.loss,
        wire.decode_required(request, "predictions"),
        wire.decode_required(request, "targets"),
        reduction=wire.decode_reduction(request.reduction),
        sample_weight=wire.decode_optional(request, "sample_weight"),
        gradient=gradient,
        allow_nonfinite=request.allow_nonfinite,
        **wire.decode_params(request),
    )
    if isinstance(result.loss, np.ndarray):
        wire.encode_tensor(result.loss, response.losses)
    else:
        response.loss = float(result.loss)
    response.positions = int(result.positions)
    response.positions_counted = int(result.positions_counted)
    response.weight_sum = float(result.weight_sum)
    if gradient:
        if result.gradient is None:
            raise RuntimeError("engine returned no gradient")
        wire.encode_tensor(result.gradient, response.gradient)


def list_losses_response(losses: tuple[catalog.LossSpec, ...]) -> pb.ListLossesResponse:
    """Convert the catalog to its ListLosses message."""
    return pb.ListLossesResponse(losses=[_loss_info(spec) for spec in losses],
                                 conventions=catalog.CONVENTIONS)


def _loss_info(spec: catalog.LossSpec) -> pb.LossInfo:
    return pb.LossInfo(
        name=spec.name,
        aliases=spec.aliases,
        description=spec.description,
        predictions=_input_spec(spec.predictions),
        targets=_input_spec(spec.targets),
        params=[_param_info(p) for p in spec.params],
        class_axis_last=spec.class_axis_last,
        reference=spec.reference,
    )


def _input_spec(spec: catalog.InputSpec) -> pb.InputSpec:
    return pb.InputSpec(
        kind=_KINDS[spec.kind],
        dtypes=[_DTYPES[name] for name in spec.dtypes],
        description=spec.description,
    )


def _param_info(spec: catalog.ParamSpec) -> pb.ParamInfo:
    info = pb.ParamInfo(
        name=spec.name,
        type=_PARAM_TYPES[spec.type],
        optional=spec.optional,
        description=spec.description,
    )
    if spec.default is not None:
        if spec.type is catalog.ParamType.DOUBLE:
            info.default_double = float(spec.default)
        elif spec.type is catalog.ParamType.BOOL:
            info.default_bool = bool(spec.default)
        elif spec.type is catalog.ParamType.INT64:
            info.default_int64 = int(spec.default)
    if spec.minimum is not None:
        info.minimum = spec.minimum
        info.minimum_inclusive = spec.minimum_inclusive
    if spec.maximum is not None:
        info.maximum = spec.maximum
        info.maximum_inclusive = spec.maximum_inclusive
    return info
