"""The Open Inference Protocol (KServe v2) gRPC API, ``inference.GRPCInferenceService``:
every loss of the catalog is a model, so that tritonclient, perf_analyzer, KServe and
Seldon call lossgrad with their own code.

A model takes the inputs PREDICTIONS, TARGETS, optionally SAMPLE_WEIGHT (and VARIANCE for
the losses with a variance), and gives the outputs LOSS (FP64: the scalar of the
``sum``/``mean`` reductions as shape [1], the per-position values of ``none`` in their
shape) and GRADIENT (the predictions' shape and datatype); HESSIAN and VARIANCE_GRADIENT
only when requested. Loss parameters, ``reduction``, ``allow_nonfinite`` and the Hessian's
``hessian``/``hessian_floor``/``hessian_constant`` are request parameters.
ModelInfer converts the request to arrays and calls :func:`lossgrad.engine.compute`, as
``lossgrad.v1`` does, so both APIs give the same bits; tensors are validated by the same
code (:func:`lossgrad.wire.decode_tensor`, then the engine). Errors keep the engine's
reasons; their field names the protocol's input or parameter (``TARGETS.shape``,
``parameters.delta``). The generated protobuf classes carry the messages (the raw
outputs are written into the serialized response once): this API is for
interoperability, ``lossgrad.v1`` (with its zero-copy codec) for speed. The conversions
are in :mod:`lossgrad.kserve_convert`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from lossgrad_client import _wire

from . import __version__, catalog, engine, wire
from ._proto.inference import grpc_predict_v2_pb2 as kpb
from ._proto.inference import model_config_pb2 as config_pb
from .catalog import Layout, LossSpec
from .errors import (
    UNKNOWN_MODEL,
    DeadlineExceededError,
    InvalidArgumentError,
    LossgradError,
    NotFoundError,
)
from .kserve_convert import (
    GRADIENT,
    HESSIAN,
    LOSS,
    PREDICTIONS,
    SAMPLE_WEIGHT,
    TARGETS,
    VARIANCE,
    VARIANCE_GRADIENT,
    InferResponse,
    input_tensors,
    protocol_fields,
    request_options,
    requested_outputs,
    response,
    serialize_infer,
    settle_hessian,
)
from .status import abort

T = TypeVar("T")

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "lossgrad"
PLATFORM = "lossgrad"
MODEL_VERSION = "1"


class InferenceService:
    """Servicer of ``inference.GRPCInferenceService`` over the engine and the catalog.

    ``ready()`` says whether the server is ready (kernels warmed, not shutting down): the
    same state as the readiness of ``lossgrad.v1.LossService`` in grpc.health.v1.
    """

    def __init__(self, *, ready: Callable[[], bool], max_elements: int | None = None) -> None:
        self._ready = ready
        self._max_elements = max_elements
        self._metadata = {name: model_metadata(name, spec) for name, spec in _models().items()}
        self._configs = {name: model_config(meta) for name, meta in self._metadata.items()}

    def ServerLive(self, request: kpb.ServerLiveRequest,
                   context: grpc.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)  # answering at all is being live

    def ServerReady(self, request: kpb.ServerReadyRequest,
                    context: grpc.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request: kpb.ModelReadyRequest,
                   context: grpc.ServicerContext) -> kpb.ModelReadyResponse:
        known = request.name in self._metadata and request.version in ("", MODEL_VERSION)
        return kpb.ModelReadyResponse(ready=known and self._ready())

    def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=__version__)

    def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> kpb.ModelMetadataResponse:
        return _of_model(self._metadata, request, context, "ModelMetadata")

    def ModelConfig(self, request: kpb.ModelConfigRequest,
                    context: grpc.ServicerContext) -> kpb.ModelConfigResponse:
        """Triton's model configuration extension: perf_analyzer reads it first."""
        return _of_model(self._configs, request, context, "ModelConfig")

    def ModelInfer(self, request: kpb.ModelInferRequest,
                   context: grpc.ServicerContext) -> InferResponse:
        try:
            return self._infer(request, context)
        except Exception as err:
            abort(context, err, "ModelInfer")

    def _infer(self, request: kpb.ModelInferRequest,
               context: grpc.ServicerContext) -> InferResponse:
        spec = _check_model(request.model_name, request.model_version)
        tensors = input_tensors(request)
        wire.check_elements(_wire.ComputeRequest(
            predictions=tensors.get(PREDICTIONS), targets=tensors.get(TARGETS),
            sample_weight=tensors.get(SAMPLE_WEIGHT), variance=tensors.get(VARIANCE)),
            self._max_elements)
        outputs = requested_outputs(request)
        options = request_options(request.parameters, spec)
        settle_hessian(options, outputs)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has stopped waiting
            raise DeadlineExceededError("", "the deadline passed before the call was computed")
        with protocol_fields():
            arrays = {name: wire.decode_tensor(tensor, name.lower())
                      for name, tensor in tensors.items()}
            result = engine.compute(
                request.model_name, arrays[PREDICTIONS], arrays[TARGETS],
                sample_weight=arrays.get(SAMPLE_WEIGHT), variance=arrays.get(VARIANCE),
                gradient=any(out.gradient for out in outputs), **options)
        raw = len(request.raw_input_contents) > 0
        return response(request, MODEL_VERSION, outputs, result, raw)


def method_handlers(service: InferenceService) -> dict[str, grpc.RpcMethodHandler]:
    """The RPC method handlers of ``service``, by method name (the protocol's required
    subset and Triton's ModelConfig; gRPC answers UNIMPLEMENTED for the others)."""
    return {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
        for name, request, response in (
            ("ServerLive", kpb.ServerLiveRequest, kpb.ServerLiveResponse),
            ("ServerReady", kpb.ServerReadyRequest, kpb.ServerReadyResponse),
            ("ModelReady", kpb.ModelReadyRequest, kpb.ModelReadyResponse),
            ("ServerMetadata", kpb.ServerMetadataRequest, kpb.ServerMetadataResponse),
            ("ModelMetadata", kpb.ModelMetadataRequest, kpb.ModelMetadataResponse),
            ("ModelConfig", kpb.ModelConfigRequest, kpb.ModelConfigResponse),
        )
    } | {"ModelInfer": grpc.unary_unary_rpc_method_handler(
        service.ModelInfer, request_deserializer=kpb.ModelInferRequest.FromString,
        response_serializer=serialize_infer)}


# --- models and their metadata ------------------------------------------------------

def _models() -> dict[str, LossSpec]:
    """Every name a model answers to: each loss's name and its aliases."""
    return {name: spec for spec in catalog.all_losses()  # plugin losses included
            for name in (spec.name, *spec.aliases)}


def _of_model(answers: dict[str, T], request: Any, context: grpc.ServicerContext,
              method: str) -> T:
    """The prepared answer for the model that ``request`` names (``name``, ``version``);
    NOT_FOUND for another."""
    try:
        _check_model(request.name, request.version)
    except LossgradError as err:
        abort(context, err, method)
    return answers[request.name]


def _check_model(name: str, version: str) -> LossSpec:
    """The loss a model name stands for; NOT_FOUND for an unknown name or version."""
    try:
        spec = catalog.lookup(name)
    except InvalidArgumentError:
        raise NotFoundError("model_name", f"unknown model {name!r}; the models are the losses "
                            f"of the catalog: {', '.join(sorted(_models()))}",
                            UNKNOWN_MODEL) from None
    if version not in ("", MODEL_VERSION):
        raise NotFoundError("model_version", f"model {name!r} has no version {version!r}; "
                            f"its one version is {MODEL_VERSION!r}", UNKNOWN_MODEL)
    return spec


def model_metadata(name: str, spec: LossSpec) -> kpb.ModelMetadataResponse:
    """The inputs and outputs of a loss as a model. Shapes show the lowest rank the loss
    takes, every dimension -1 (any size; more leading dimensions are accepted too); the
    datatype is the usual one (FP64 is accepted wherever FP32 is, INT32 wherever INT64
    is, and GRADIENT and HESSIAN take the datatype of PREDICTIONS). HESSIAN is listed
    for the losses that have a Hessian, VARIANCE and VARIANCE_GRADIENT for those that
    take a variance."""
    rows = spec.layout is not Layout.ELEMENTWISE
    x_shape = [-1, -1] if rows else [-1]
    sparse = spec.layout is Layout.SPARSE_ROWS
    meta = kpb.ModelMetadataResponse.TensorMetadata
    return kpb.ModelMetadataResponse(
        name=name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[meta(name=PREDICTIONS, datatype="FP32", shape=x_shape),
                meta(name=TARGETS, datatype="INT64" if sparse else "FP32",
                     shape=[-1] if sparse else x_shape),
                meta(name=SAMPLE_WEIGHT, datatype="FP32", shape=[-1]),
                *([meta(name=VARIANCE, datatype="FP32", shape=x_shape)]
                  if spec.variance is not None else [])],
        outputs=[meta(name=LOSS, datatype="FP64", shape=[-1]),
                 meta(name=GRADIENT, datatype="FP32", shape=x_shape),
                 *([meta(name=HESSIAN, datatype="FP32", shape=x_shape)]
                   if spec.hessian_modes else []),
                 *([meta(name=VARIANCE_GRADIENT, datatype="FP32", shape=x_shape)]
                   if spec.variance is not None else [])])


def model_config(meta: kpb.ModelMetadataResponse) -> kpb.ModelConfigResponse:
    """The model's configuration in Triton's terms: the tensors of its metadata, no
    server-side batching (``max_batch_size`` 0), SAMPLE_WEIGHT optional."""
    def data_type(datatype: str) -> int:
        return int(config_pb.DataType.Value(f"TYPE_{datatype}"))

    return kpb.ModelConfigResponse(config=config_pb.ModelConfig(
        name=meta.name, platform=PLATFORM, backend=PLATFORM, max_batch_size=0,
        input=[config_pb.ModelInput(name=t.name, data_type=data_type(t.datatype), dims=t.shape,
                                    optional=t.name == SAMPLE_WEIGHT) for t in meta.inputs],
        output=[config_pb.ModelOutput(name=t.name, data_type=data_type(t.datatype),
                                      dims=t.shape) for t in meta.outputs]))
