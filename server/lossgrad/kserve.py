"""The Open Inference Protocol (KServe v2) gRPC API, ``inference.GRPCInferenceService``:
every loss of the catalog is a model, so that tritonclient, perf_analyzer, KServe and
Seldon call lossgrad with their own code.

A model takes the inputs PREDICTIONS, TARGETS and, optionally, SAMPLE_WEIGHT, and gives
the outputs LOSS (FP64: the scalar of the ``sum``/``mean`` reductions as shape [1], the
per-position values of ``none`` in their shape) and GRADIENT (the predictions' shape and
datatype). Loss parameters, ``reduction`` and ``allow_nonfinite`` are request parameters.
ModelInfer converts the request to arrays and calls :func:`lossgrad.engine.compute`, as
``lossgrad.v1`` does, so both APIs give the same bits; tensors are validated by the same
code (:func:`lossgrad.wire.decode_tensor`, then the engine). Errors keep the engine's
reasons; their field names the protocol's input or parameter (``TARGETS.shape``,
``parameters.delta``). The generated protobuf classes carry the messages: this API is
for interoperability, ``lossgrad.v1`` (with its zero-copy codec) for speed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from lossgrad_client import _wire
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

from . import __version__, catalog, engine, wire
from ._proto.inference import grpc_predict_v2_pb2 as kpb
from ._proto.inference import model_config_pb2 as config_pb
from .catalog import Layout, LossSpec, ParamType
from .errors import (
    BYTE_SIZE_MISMATCH,
    MALFORMED_REQUEST,
    MISSING_FIELD,
    PARAMETER_OUT_OF_RANGE,
    UNKNOWN_MODEL,
    UNKNOWN_TENSOR,
    UNSUPPORTED_DTYPE,
    DeadlineExceededError,
    InvalidArgumentError,
    LossgradError,
    NotFoundError,
)
from .status import abort

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "lossgrad"
PLATFORM = "lossgrad"
MODEL_VERSION = "1"

PREDICTIONS, TARGETS, SAMPLE_WEIGHT = "PREDICTIONS", "TARGETS", "SAMPLE_WEIGHT"
LOSS, GRADIENT = "LOSS", "GRADIENT"
# Request parameters that are not loss parameters.
REDUCTION, ALLOW_NONFINITE = "reduction", "allow_nonfinite"
# Triton's own request parameters: the scheduling hints tritonclient sends when asked
# (queue priority and queue timeout) and the reserved ``triton_`` ones that its tools
# send (perf_analyzer: triton_enable_empty_final_response). They steer Triton's
# scheduler and streaming, which lossgrad does not have; they change no result.
_IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
_IGNORED_PREFIX = "triton_"

# Protocol datatype <-> (lossgrad.v1 DataType, little-endian dtype, typed contents field).
# FP16 and BF16 have no typed contents field: they travel in raw_input_contents.
_DATATYPES: dict[str, tuple[int, np.dtype[Any], str]] = {
    "FP32": (pb.DATA_TYPE_FLOAT32, np.dtype("<f4"), "fp32_contents"),
    "FP64": (pb.DATA_TYPE_FLOAT64, np.dtype("<f8"), "fp64_contents"),
    "INT32": (pb.DATA_TYPE_INT32, np.dtype("<i4"), "int_contents"),
    "INT64": (pb.DATA_TYPE_INT64, np.dtype("<i8"), "int64_contents"),
    "FP16": (pb.DATA_TYPE_FLOAT16, wire.numpy_dtype("float16"), ""),
    "BF16": (pb.DATA_TYPE_BFLOAT16, wire.numpy_dtype("bfloat16"), ""),
}
_DATATYPE_OF = {dtype.name: name for name, (_, dtype, _) in _DATATYPES.items()}
# Engine field prefixes -> the protocol's names, for error fields.
_FIELD_NAMES = {"predictions": PREDICTIONS, "targets": TARGETS, "sample_weight": SAMPLE_WEIGHT,
                "params": "parameters", "reduction": f"parameters.{REDUCTION}"}


@dataclass(frozen=True)
class Output:
    """An output a model can give. ``default`` outputs are returned when the request
    names none; ``gradient`` says whether computing it needs the engine's gradient."""

    name: str
    gradient: bool
    default: bool = True


# A HESSIAN output goes here, with default=False (it costs a second pass), once the engine
# computes Hessians; _infer then passes the engine's flag for it and _outputs encodes it.
OUTPUTS: tuple[Output, ...] = (Output(LOSS, gradient=False), Output(GRADIENT, gradient=True))
_OUTPUTS_BY_NAME = {out.name: out for out in OUTPUTS}


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
        try:
            _check_model(request.name, request.version)
        except LossgradError as err:
            abort(context, err, "ModelMetadata")
        return self._metadata[request.name]

    def ModelConfig(self, request: kpb.ModelConfigRequest,
                    context: grpc.ServicerContext) -> kpb.ModelConfigResponse:
        """Triton's model configuration extension: perf_analyzer reads it first."""
        try:
            _check_model(request.name, request.version)
        except LossgradError as err:
            abort(context, err, "ModelConfig")
        return self._configs[request.name]

    def ModelInfer(self, request: kpb.ModelInferRequest,
                   context: grpc.ServicerContext) -> kpb.ModelInferResponse:
        try:
            return self._infer(request, context)
        except Exception as err:
            abort(context, err, "ModelInfer")

    def _infer(self, request: kpb.ModelInferRequest,
               context: grpc.ServicerContext) -> kpb.ModelInferResponse:
        spec = _check_model(request.model_name, request.model_version)
        tensors = _input_tensors(request)
        wire.check_elements(_wire.ComputeRequest(
            predictions=tensors.get(PREDICTIONS), targets=tensors.get(TARGETS),
            sample_weight=tensors.get(SAMPLE_WEIGHT)), self._max_elements)
        outputs = _requested_outputs(request)
        options = _request_options(request.parameters, spec)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has stopped waiting
            raise DeadlineExceededError("", "the deadline passed before the call was computed")
        with _protocol_fields():
            arrays = {name: wire.decode_tensor(tensor, name.lower())
                      for name, tensor in tensors.items()}
            result = engine.compute(
                request.model_name, arrays[PREDICTIONS], arrays[TARGETS],
                sample_weight=arrays.get(SAMPLE_WEIGHT),
                gradient=any(out.gradient for out in outputs), **options)
        raw = len(request.raw_input_contents) > 0
        return _response(request, outputs, result, raw)


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
            ("ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse),
            ("ModelConfig", kpb.ModelConfigRequest, kpb.ModelConfigResponse),
        )
    }


# --- models and their metadata ------------------------------------------------------

def _models() -> dict[str, LossSpec]:
    """Every name a model answers to: each loss's name and its aliases."""
    return {name: spec for spec in catalog.all_losses()  # plugin losses included
            for name in (spec.name, *spec.aliases)}


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
    is, and GRADIENT takes the datatype of PREDICTIONS)."""
    rows = spec.layout is not Layout.ELEMENTWISE
    x_shape = [-1, -1] if rows else [-1]
    sparse = spec.layout is Layout.SPARSE_ROWS
    meta = kpb.ModelMetadataResponse.TensorMetadata
    return kpb.ModelMetadataResponse(
        name=name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[meta(name=PREDICTIONS, datatype="FP32", shape=x_shape),
                meta(name=TARGETS, datatype="INT64" if sparse else "FP32",
                     shape=[-1] if sparse else x_shape),
                meta(name=SAMPLE_WEIGHT, datatype="FP32", shape=[-1])],
        outputs=[meta(name=LOSS, datatype="FP64", shape=[-1]),
                 meta(name=GRADIENT, datatype="FP32", shape=x_shape)])


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


# --- request ------------------------------------------------------------------------

def _input_tensors(request: kpb.ModelInferRequest) -> dict[str, _wire.Tensor]:
    """The inputs by name, as wire tensors over the raw bytes (no copy) or over an array
    built from the typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            "raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of inputs", MALFORMED_REQUEST)
    tensors: dict[str, _wire.Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in (PREDICTIONS, TARGETS, SAMPLE_WEIGHT):
            raise InvalidArgumentError(
                f"inputs[{index}].name", f"unknown input {name!r}; the inputs are "
                f"{PREDICTIONS}, {TARGETS} and (optional) {SAMPLE_WEIGHT}", UNKNOWN_TENSOR)
        if name in tensors:
            raise InvalidArgumentError(f"inputs[{index}].name", f"input {name} is given twice",
                                       MALFORMED_REQUEST)
        found = _DATATYPES.get(tensor.datatype)
        if found is None:
            raise InvalidArgumentError(
                f"{name}.datatype", f"unsupported datatype {tensor.datatype!r}; use one of "
                + ", ".join(_DATATYPES), UNSUPPORTED_DTYPE)
        code, dtype, contents_field = found
        shape = tuple(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(
                    f"{name}.contents", "give each input in raw_input_contents or in "
                    "contents, not both")
            data: _wire.Buffer = raw[index]
        elif not contents_field:
            raise InvalidArgumentError(
                f"{name}.contents", f"{tensor.datatype} has no typed contents field; send it "
                "in raw_input_contents", UNSUPPORTED_DTYPE)
        else:
            data = _typed_contents(tensor, name, shape, dtype, contents_field)
        tensors[name] = _wire.Tensor(code, shape, data)
    for name in (PREDICTIONS, TARGETS):
        if name not in tensors:
            raise InvalidArgumentError(name, f"required input {name} is missing", MISSING_FIELD)
    return tensors


def _typed_contents(tensor: kpb.ModelInferRequest.InferInputTensor, name: str,
                    shape: tuple[int, ...], dtype: np.dtype[Any], field: str) -> bytes:
    """The little-endian bytes of an input given in its typed contents field."""
    values = getattr(tensor.contents, field)
    expected = math.prod(shape) if all(d >= 0 for d in shape) else None
    if expected is not None and len(values) != expected:
        raise InvalidArgumentError(
            f"{name}.contents.{field}", f"has {len(values)} values; shape {list(shape)} "
            f"needs {expected}", BYTE_SIZE_MISMATCH)
    return np.asarray(values, dtype=dtype).tobytes()


def _requested_outputs(request: kpb.ModelInferRequest) -> tuple[Output, ...]:
    if not request.outputs:
        return tuple(out for out in OUTPUTS if out.default)
    chosen: list[Output] = []
    for index, requested in enumerate(request.outputs):
        out = _OUTPUTS_BY_NAME.get(requested.name)
        if out is None:
            raise InvalidArgumentError(
                f"outputs[{index}].name", f"unknown output {requested.name!r}; the outputs "
                f"are {', '.join(_OUTPUTS_BY_NAME)}", UNKNOWN_TENSOR)
        if out not in chosen:
            chosen.append(out)
    return tuple(chosen)


def _request_options(parameters: Any, spec: LossSpec) -> dict[str, Any]:
    """The engine's keyword arguments from the request parameters: ``reduction``
    (string), ``allow_nonfinite`` (bool) and the loss's parameters, each from the
    InferParameter field of its type (a double parameter also takes an integer; a list
    parameter such as ``class_weight`` is a JSON array in a string)."""
    options: dict[str, Any] = {}
    for key, param in parameters.items():
        field = f"parameters.{key}"
        kind = param.WhichOneof("parameter_choice")
        value = None if kind is None else getattr(param, kind)
        if key == REDUCTION:
            if kind != "string_param":
                raise InvalidArgumentError(field, "must be a string: none, sum or mean",
                                           PARAMETER_OUT_OF_RANGE)
            options[REDUCTION] = value
            continue
        if key == ALLOW_NONFINITE:
            options[ALLOW_NONFINITE] = _bool(field, value)
            continue
        if key in _IGNORED_PARAMETERS or key.startswith(_IGNORED_PREFIX):
            continue
        p = spec.param(key)
        options[key] = value if p is None else _param_value(p, field, value)
    return options


def _param_value(p: catalog.ParamSpec, field: str, value: Any) -> Any:
    """Convert an InferParameter's value to what the engine's range checks take."""
    if p.type is ParamType.BOOL:
        return _bool(field, value)
    if p.type is ParamType.DOUBLE_LIST and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise InvalidArgumentError(field, f"must be a JSON array of numbers, got {value!r}",
                                       PARAMETER_OUT_OF_RANGE) from None
    if isinstance(value, (str, bool)) or (p.type is ParamType.DOUBLE_LIST and value is not None):
        what = {ParamType.DOUBLE: "a number (double_param or int64_param)",
                ParamType.INT64: "an integer (int64_param)",
                ParamType.DOUBLE_LIST: "a JSON array of numbers (string_param)"}[p.type]
        raise InvalidArgumentError(field, f"must be {what}, got {value!r}",
                                   PARAMETER_OUT_OF_RANGE)
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(field, f"must be a bool (bool_param), got {value!r}",
                                   PARAMETER_OUT_OF_RANGE)
    return value


@contextmanager
def _protocol_fields() -> Iterator[None]:
    """Rename the engine's error fields to the protocol's names (``predictions.shape``
    -> ``PREDICTIONS.shape``, ``params.delta`` -> ``parameters.delta``)."""
    try:
        yield
    except LossgradError as err:
        head, dot, rest = err.field.partition(".")
        name = _FIELD_NAMES.get(head)
        if name is None:
            raise
        renamed = name if head == "reduction" else f"{name}{dot}{rest}"
        raise type(err)(renamed, err.message, err.reason) from None


# --- response -----------------------------------------------------------------------

def _response(request: kpb.ModelInferRequest, outputs: tuple[Output, ...],
              result: engine.Result, raw: bool) -> kpb.ModelInferResponse:
    """The outputs as raw bytes (or as typed contents when the inputs came typed)."""
    response = kpb.ModelInferResponse(model_name=request.model_name,
                                      model_version=MODEL_VERSION, id=request.id)
    for out in outputs:
        if out.name == LOSS:
            array = np.asarray(result.loss, dtype=np.float64).reshape(
                np.shape(result.loss) or (1,))
        else:
            array = result.gradient
        assert array is not None
        datatype = _DATATYPE_OF[array.dtype.name]
        tensor = response.outputs.add(name=out.name, datatype=datatype, shape=array.shape)
        little = array.astype(_DATATYPES[datatype][1], copy=False)
        if raw:
            response.raw_output_contents.append(little.tobytes())
        else:
            getattr(tensor.contents, _DATATYPES[datatype][2]).extend(little.reshape(-1).tolist())
    return response
