"""The LossService servicer: convert the request, call the engine, convert the result.

ComputeLoss and ComputeGradient read and write their messages with the client
package's hand-written codec (:mod:`lossgrad_client._wire`: no copy of the request's
tensors, one copy of the response's); ListLosses uses the generated classes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._wire import (
    ComputeRequest,
    ComputeResponse,
    SharedMemoryLocation,
    StreamRequest,
    StreamResponse,
    Tensor,
    WireError,
    serialize_response,
    serialize_stream_response,
)

from . import catalog, engine, plugin, shm, stream, wire
from .errors import MISSING_FIELD, DeadlineExceededError, InvalidArgumentError
from .status import abort

SERVICE_NAME = "lossgrad.v1.LossService"
T = TypeVar("T")

_KINDS = {kind: pb.InputKind.Value(f"INPUT_KIND_{kind.name}") for kind in catalog.InputKind}
_PARAM_TYPES = {t: pb.ParamType.Value(f"PARAM_TYPE_{t.name}") for t in catalog.ParamType}
_HESSIAN_MODES = {m: pb.HessianMode.Value(f"HESSIAN_MODE_{m.name}") for m in catalog.HessianMode}
DEFAULT_MAX_STREAM_CHUNKS = 1_000_000
CANCELLATION_WAIT = 0.1  # seconds a short stream waits for gRPC to report a cancellation
SUPPORTED_DTYPES = ("float32", "float64", "int32", "int64", "float16", "bfloat16")
_DTYPES = {name: wire.data_type(wire.numpy_dtype(name)) for name in SUPPORTED_DTYPES}


class LossService:
    """Thin servicer over :func:`lossgrad.engine.compute` and :data:`lossgrad.catalog.LOSSES`.

    Register it with :func:`method_handlers`: the Compute* methods take the codec's
    parsed requests (or the WireError of a malformed one), not generated messages.
    """

    def __init__(self, *, max_elements: int | None = None,
                 max_stream_elements: int | None = None,
                 max_stream_chunks: int = DEFAULT_MAX_STREAM_CHUNKS,
                 server_info: Callable[[], pb.GetServerInfoResponse] | None = None,
                 shared_memory: shm.SharedMemoryRegistry | None = None) -> None:
        self._catalog = list_losses_response(catalog.all_losses())
        self._max_elements = max_elements
        self._max_stream_elements = max_stream_elements
        self._max_stream_chunks = max_stream_chunks
        self._server_info = server_info or pb.GetServerInfoResponse
        self._shared_memory = shared_memory  # None: off

    def ComputeLoss(
        self, request: ComputeRequest | WireError, context: grpc.ServicerContext
    ) -> ComputeResponse:
        try:
            return self._compute(wire.parsed(request), context, gradient=False)
        except Exception as err:
            abort(context, err, "ComputeLoss")

    def ComputeGradient(
        self, request: ComputeRequest | WireError, context: grpc.ServicerContext
    ) -> ComputeResponse:
        try:
            return self._compute(wire.parsed(request), context, gradient=True)
        except Exception as err:
            abort(context, err, "ComputeGradient")

    def _compute(self, request: ComputeRequest, context: grpc.ServicerContext, *,
                 gradient: bool) -> ComputeResponse:
        if self._max_elements is not None:
            wire.check_elements(request, self._max_elements)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has stopped waiting
            raise DeadlineExceededError("", "the deadline passed before the call was computed")
        field = shm.first_use(request, gradient)
        if field is None:
            return _compute(request, gradient=gradient)
        if self._shared_memory is None:
            raise shm.disabled(field)
        with self._shared_memory.call() as scope:
            return _compute(request, gradient=gradient, scope=scope)

    def ComputeStream(
        self, requests: Iterator[StreamRequest | WireError], context: grpc.ServicerContext
    ) -> Iterator[StreamResponse]:
        try:
            messages = _checked(_ahead(requests, "lossgrad-stream-receive"), context)
            first = next(messages, None)
            if first is None:
                raise stream.StreamEndedError("header", "the stream ended before its header",
                                              MISSING_FIELD)
            if first.header is None:
                raise InvalidArgumentError("header", "the first message must carry the header",
                                           MISSING_FIELD)
            call = stream.StreamCall(first.header, max_elements=self._max_stream_elements,
                                     max_chunks=self._max_stream_chunks)
            yield call.ready()
            yield from _ahead(call.run(messages), "lossgrad-stream-compute")
        except grpc.RpcError:  # reading the next message failed: the call has ended
            _abort_ended(context)
        except stream.StreamEndedError as err:
            if _terminated(context, CANCELLATION_WAIT):
                _abort_ended(context)
            abort(context, err, "ComputeStream")
        except Exception as err:
            abort(context, err, "ComputeStream")

    def ListLosses(
        self, request: pb.ListLossesRequest, context: grpc.ServicerContext
    ) -> pb.ListLossesResponse:
        return self._catalog  # built once; never mutated, so safe to share between calls

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return self._server_info()

    def RegisterSharedMemoryRegion(
        self, request: pb.RegisterSharedMemoryRegionRequest, context: grpc.ServicerContext
    ) -> pb.RegisterSharedMemoryRegionResponse:
        try:
            self._registry().register(request.name, request.key, request.offset,
                                      request.byte_size)
        except Exception as err:
            abort(context, err, "RegisterSharedMemoryRegion")
        return pb.RegisterSharedMemoryRegionResponse()

    def UnregisterSharedMemoryRegion(
        self, request: pb.UnregisterSharedMemoryRegionRequest, context: grpc.ServicerContext
    ) -> pb.UnregisterSharedMemoryRegionResponse:
        try:
            self._registry().unregister(request.name)
        except Exception as err:
            abort(context, err, "UnregisterSharedMemoryRegion")
        return pb.UnregisterSharedMemoryRegionResponse()

    def GetSharedMemoryStatus(
        self, request: pb.GetSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetSharedMemoryStatusResponse:
        try:
            regions = self._registry().status(request.name)
        except Exception as err:
            abort(context, err, "GetSharedMemoryStatus")
        return pb.GetSharedMemoryStatusResponse(regions=[
            pb.SharedMemoryRegionStatus(name=r.name, key=r.key, offset=r.offset,
                                        byte_size=r.byte_size, writable=r.writable)
            for r in regions])

    def _registry(self) -> shm.SharedMemoryRegistry:
        if self._shared_memory is None:
            raise shm.disabled("")
        return self._shared_memory


def _terminated(context: grpc.ServicerContext, wait: float) -> bool:
    """Whether the call ends within ``wait`` seconds without a status from the handler:
    cancelled by the client, or past its deadline. gRPC may end a cancelled call's
    messages before it reports the cancellation, so a short stream waits that long."""
    ended = threading.Event()
    if context.add_callback(ended.set):
        ended.wait(wait)
    return not context.is_active()


def _abort_ended(context: grpc.ServicerContext) -> NoReturn:
    """End a call that gRPC has ended: DEADLINE_EXCEEDED if its deadline passed, else
    CANCELLED (the status only reaches the metrics and the access log)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        abort(context, DeadlineExceededError("", "the deadline passed during the stream"),
              "ComputeStream")
    context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the stream")
    raise AssertionError("unreachable")  # context.abort raises


def _checked(messages: Iterator[StreamRequest | WireError],
             context: grpc.ServicerContext) -> Iterator[StreamRequest]:
    """The stream's parsed messages; a malformed one, a passed deadline or a cancelled
    call ends it."""
    for index, message in enumerate(messages):
        if isinstance(message, WireError):
            raise wire.parsed_error(message, f"chunk[{index - 1}]" if index else "header")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("", "the deadline passed during the stream")
        yield message
        del message  # not held while the next one is received


_ITEM, _END, _ERROR = range(3)
_DONE = object()


def _ahead(items: Iterator[T], name: str, depth: int = 1) -> Iterator[T]:
    """``items`` produced on a thread of their own, at most ``depth`` ahead of the one the
    caller holds: the next chunk is received while this one is computed, and computed
    while gRPC sends this one's gradient. The producer's exception is raised here; when
    the caller stops, the producer stops before its next item."""
    slots = threading.Semaphore(depth)
    ahead: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, _DONE)
                if item is _DONE:
                    ahead.put((_END, None))
                    return
                ahead.put((_ITEM, item))
                del item  # only the caller holds it now
        except Exception as err:  # the call was cancelled or failed: raised to the caller
            ahead.put((_ERROR, err))

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while True:
            kind, item = ahead.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise item
            slots.release()
            yield item
            del item
    finally:
        stop.set()


def method_handlers(service: LossService) -> dict[str, grpc.RpcMethodHandler]:
    """The RPC method handlers of ``service``, by method name."""
    return {
        "ComputeLoss": grpc.unary_unary_rpc_method_handler(
            service.ComputeLoss, request_deserializer=wire.deserialize_request,
            response_serializer=serialize_response),
        "ComputeGradient": grpc.unary_unary_rpc_method_handler(
            service.ComputeGradient, request_deserializer=wire.deserialize_request,
            response_serializer=serialize_response),
        "ListLosses": grpc.unary_unary_rpc_method_handler(
            service.ListLosses, request_deserializer=pb.ListLossesRequest.FromString,
            response_serializer=pb.ListLossesResponse.SerializeToString),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo, request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.GetServerInfoResponse.SerializeToString),
        "ComputeStream": grpc.stream_stream_rpc_method_handler(
            service.ComputeStream, request_deserializer=wire.deserialize_stream_request,
            response_serializer=serialize_stream_response),
        **{name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString)
           for name, request_type, response_type in _SHARED_MEMORY_METHODS},
    }


_SHARED_MEMORY_METHODS: tuple[tuple[str, Any, Any], ...] = (
    ("RegisterSharedMemoryRegion", pb.RegisterSharedMemoryRegionRequest,
     pb.RegisterSharedMemoryRegionResponse),
    ("UnregisterSharedMemoryRegion", pb.UnregisterSharedMemoryRegionRequest,
     pb.UnregisterSharedMemoryRegionResponse),
    ("GetSharedMemoryStatus", pb.GetSharedMemoryStatusRequest,
     pb.GetSharedMemoryStatusResponse),
)


def _compute(request: ComputeRequest, *, gradient: bool,
             scope: shm.CallScope | None = None) -> ComputeResponse:
    """Run one Compute* request (the two RPCs differ only in ``gradient``; the Hessian
    fields are ComputeGradientRequest's, unknown fields to ComputeLoss). With a
    shared-memory ``scope``, tensors may be read from regions and outputs written there."""
    hessian = wire.hessian_options(request) if gradient else {}
    decode = wire.decode_tensor if scope is None else scope.decode
    predictions = wire.decode_required(request.predictions, "predictions", decode)
    targets = wire.decode_required(request.targets, "targets", decode)
    reduction = wire.decode_reduction(request.reduction)
    sample_weight = wire.decode_optional(request.sample_weight, "sample_weight", decode)
    gradient_out = losses_out = None
    if scope is not None:
        itemsize = predictions.dtype.itemsize
        if gradient and request.gradient_output is not None:
            gradient_out = scope.output(request.gradient_output, "gradient_output", itemsize)
        if request.losses_output is not None:
            losses_out = scope.output(request.losses_output, "losses_output", itemsize)
    result = engine.compute(
        request.loss, predictions, targets, reduction=reduction, sample_weight=sample_weight,
        gradient=gradient, allow_nonfinite=request.allow_nonfinite,
        gradient_out=gradient_out, losses_out=losses_out,
        variance=wire.decode_optional(request.variance, "variance", decode), **hessian,
        **wire.decode_params(request.params),
    )
    if gradient and result.gradient is None:
        raise RuntimeError("engine returned no gradient")
    per_position = isinstance(result.loss, np.ndarray)
    return ComputeResponse(
        loss=0.0 if per_position else float(result.loss),
        losses=_tensor(result.loss, request.losses_output) if per_position else None,
        positions=int(result.positions),
        positions_counted=int(result.positions_counted),
        weight_sum=float(result.weight_sum),
        gradient=_tensor(result.gradient, request.gradient_output) if gradient else None,
        hessian=None if result.hessian is None else wire.encode_tensor(result.hessian),
        variance_gradient=(None if result.variance_gradient is None
                           else wire.encode_tensor(result.variance_gradient)),
    )


def _tensor(array: Any, location: SharedMemoryLocation | None) -> Tensor:
    """A response tensor: the array's bytes, or (written in place) where they are."""
    if location is None:
        return wire.encode_tensor(array)
    return Tensor(wire.data_type(array.dtype), array.shape, b"",
                  SharedMemoryLocation(location.region, location.offset, array.nbytes))


def list_losses_response(losses: tuple[catalog.LossSpec, ...]) -> pb.ListLossesResponse:
    """Convert the catalog to its ListLosses message."""
    return pb.ListLossesResponse(losses=[_loss_info(spec) for spec in losses],
                                 conventions=catalog.CONVENTIONS)


def _loss_info(spec: catalog.LossSpec) -> pb.LossInfo:
    info = pb.LossInfo(
        name=spec.name,
        aliases=spec.aliases,
        description=spec.description,
        predictions=_input_spec(spec.predictions),
        targets=_input_spec(spec.targets),
        params=[_param_info(p) for p in spec.params],
        class_axis_last=spec.class_axis_last,
        reference=spec.reference,
        hessian_modes=[_HESSIAN_MODES[m] for m in spec.hessian_modes],
        hessian=spec.hessian,
        origin=pb.LOSS_ORIGIN_BUILTIN if spec.plugin is None else pb.LOSS_ORIGIN_PLUGIN,
        plugin=None if spec.plugin is None else plugin.source_proto(spec.plugin),
        alias_params={alias: pb.LossParams(**preset)
                      for alias, preset in spec.alias_presets.items()},
    )
    if spec.variance is not None:
        info.variance.CopyFrom(_input_spec(spec.variance))
    return info


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
