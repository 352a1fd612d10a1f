"""LossClient: the typed, blocking client of lossgrad.v1.LossService."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    METHOD_PREFIX,
    channel_settings,
)
from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._requests import (
    LIST_LOSSES_REQUEST,
    compute_request,
    gradient_result,
    loss_infos,
    loss_result,
    no_hessian_stream,
    with_hessian,
)
from ._stream import (
    DEFAULT_CHUNK_BYTES,
    Progress,
    StreamPlan,
    request_bytes,
    stream_sizes,
    with_out,
)
from ._types import GradientResult, LossInfo, LossResult
from ._wire import ComputeRequest, StreamRequest, serialize_request, serialize_stream_request
from .errors import from_rpc_error

_Client = TypeVar("_Client", bound="LossClient")

CLIENT_ARGUMENTS_DOC = """
    ``target`` is ``"host:port"`` (any gRPC target string, e.g. ``"dns:///name:port"``
    for every address a name resolves to) or a list of ``"ip:port"`` addresses;
    ``load_balancing`` ("round_robin", or "pick_first") spreads the calls over them,
    each call to the next server. ``timeout`` is the default deadline of every call in
    seconds (None: no deadline); each method's ``timeout`` overrides it. A call that
    fails with UNAVAILABLE (no server reachable, a server shutting down) is retried up
    to ``retries`` times (0 to 4) with exponential backoff, within the deadline.
    ``max_message_bytes`` bounds requests and responses and should match the server's.
    ``root_certificates`` (PEM; None with a key and chain: the system's roots) makes a
    TLS channel, mutual TLS with ``private_key`` and ``certificate_chain``; ``credentials``
    gives gRPC channel credentials instead. ``token`` is sent with every call as
    ``authorization: Bearer <token>``. ``options`` are extra gRPC channel arguments
    (they override the ones these arguments set). Requests whose tensors exceed
    ``stream_threshold_bytes`` (default: half of ``max_message_bytes``) go by the
    ComputeStream RPC in chunks of ``stream_chunk_bytes`` (at most half of
    ``max_message_bytes``), with the same results.
"""


class LossClient:
    """Blocking client of a lossgrad server; safe to share between threads.

    Use it as a context manager or call :meth:`close`. Arrays in results are read-only
    views of the response bytes; copy one to modify it. Every error is a
    :class:`lossgrad_client.LossgradError`.
    """

    __doc__ = (__doc__ or "") + CLIENT_ARGUMENTS_DOC

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        stream_threshold_bytes: int | None = None,
        stream_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        settings = channel_settings(
            target, max_message_bytes=max_message_bytes, retries=retries,
            load_balancing=load_balancing, options=options, credentials=credentials,
            root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, token=token)
        self._settings = settings
        self._timeout = timeout
        self._stream_threshold, self._chunk_bytes = stream_sizes(
            max_message_bytes, stream_threshold_bytes, stream_chunk_bytes)
        if settings.credentials is None:
            self._channel = grpc.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(settings.target, settings.credentials,
                                                options=settings.options)
        # The Compute* methods use the hand-written codec (see _wire): the request is
        # built from the arrays with one copy, and the response comes back as bytes that
        # the results view.
        self._compute_loss = self._channel.unary_unary(
            METHOD_PREFIX + "ComputeLoss", request_serializer=serialize_request,
            _registered_method=True)
        self._compute_gradient = self._channel.unary_unary(
            METHOD_PREFIX + "ComputeGradient", request_serializer=serialize_request,
            _registered_method=True)
        self._compute_stream = self._channel.stream_stream(
            METHOD_PREFIX + "ComputeStream", request_serializer=serialize_stream_request,
            _registered_method=True)
        self._list_losses = self._channel.unary_unary(
            METHOD_PREFIX + "ListLosses",
            request_serializer=pb.ListLossesRequest.SerializeToString,
            response_deserializer=pb.ListLossesResponse.FromString, _registered_method=True)

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.target!r})"

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def compute_loss(
        self,
        loss: str,
        predictions: Any,
        targets: Any,
        *,
        reduction: str = "mean",
        sample_weight: Any = None,
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        stream: bool | None = None,
        progress: Progress | None = None,
        **params: Any,
    ) -> LossResult:
        """Compute a loss on the server.

        ``loss`` is a name or alias from :meth:`list_losses`. ``predictions``,
        ``targets`` and ``sample_weight`` are anything ``np.asarray`` takes:
        float32/float64 (int32/int64 for class indices and labels); Python lists of
        floats are sent as float64. ``reduction`` is "none", "sum" or "mean".
        ``params`` are the loss's parameters (``delta=0.5``, ``from_logits=True``,
        ``class_weight=[...]``); None leaves one unset. With ``allow_nonfinite`` the
        server accepts NaN and Inf instead of rejecting them. ``timeout`` (seconds)
        overrides the client's for this call.

        Tensors of more than ``stream_threshold_bytes`` together go by ComputeStream, in
        chunks of ``stream_chunk_bytes`` (``stream=True`` forces it, ``stream=False``
        forbids it): any size, the same bits as one message. ``progress(sent, total)``
        is called with the bytes sent after each chunk (from gRPC's sending thread).
        """
        request = compute_request(loss, predictions, targets, reduction, sample_weight,
                                  allow_nonfinite, params)
        if self._streams(request, stream):
            return self._stream(request, False, timeout, None, progress).loss_result()
        return loss_result(self._call(self._compute_loss, request, timeout), request)

    def compute_gradient(
        self,
        loss: str,
        predictions: Any,
        targets: Any,
        *,
        reduction: str = "mean",
        sample_weight: Any = None,
        allow_nonfinite: bool = False,
        timeout: float | None = None,
        stream: bool | None = None,
        progress: Progress | None = None,
        out: Any = None,
        hessian: str | None = None,
        hessian_floor: float | None = None,
        hessian_constant: float | None = None,
        **params: Any,
    ) -> GradientResult:
        """Compute a loss and its gradient w.r.t. ``predictions`` on the server.

        Takes the arguments of :meth:`compute_loss`. The gradient is of exactly the
        returned value (of the sum of the per-position values for "none") and has the
        predictions' shape and dtype. ``out`` (a writable C-contiguous array of that
        shape and dtype) receives it instead of a new array, and is returned as it.

        ``hessian`` also asks for the diagonal Hessian (``result.hessian``, with the
        gradient's shape, dtype, weights and scale): "exact" (the second derivative;
        0 where the loss is piecewise linear), "clipped" (``max(exact,
        hessian_floor)``, floor default 1e-16, as XGBoost floors its logistic Hessian)
        or "constant" (``hessian_constant`` per position, default 1, as boosting
        libraries run L1). :meth:`list_losses` gives each loss's ``hessian_modes``. A
        call with a Hessian is one message, never streamed.
        """
        request = with_hessian(
            compute_request(loss, predictions, targets, reduction, sample_weight,
                            allow_nonfinite, params), hessian, hessian_floor, hessian_constant)
        if self._streams(request, stream):
            return self._stream(request, True, timeout, out, progress).gradient_result()
        result = gradient_result(self._call(self._compute_gradient, request, timeout), request)
        return with_out(result, out)

    def list_losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """Return the server's catalog: every loss, its inputs and its parameters."""
        return loss_infos(self._call(self._list_losses, LIST_LOSSES_REQUEST, timeout))

    def _streams(self, request: ComputeRequest, stream: bool | None) -> bool:
        if request.hessian:
            return no_hessian_stream(stream)
        return request_bytes(request) > self._stream_threshold if stream is None else stream

    def _stream(self, request: ComputeRequest, gradient: bool, timeout: float | None,
                out: Any, progress: Progress | None) -> StreamPlan:
        """Run one ComputeStream call. The request iterator runs on gRPC's thread: it
        sends the header, waits for ``ready`` (read here), then sends the chunks."""
        plan = StreamPlan(request, gradient=gradient, chunk_bytes=self._chunk_bytes, out=out,
                          progress=progress)
        ready, finished = threading.Event(), threading.Event()

        def requests() -> Iterator[StreamRequest]:
            yield plan.header
            while not ready.wait(0.05):
                if finished.is_set():
                    return
            for message in plan.messages():
                if finished.is_set():
                    return
                yield message

        try:
            for data in self._compute_stream(
                    requests(), timeout=self._timeout if timeout is None else timeout,
                    metadata=self._settings.metadata):
                plan.receive(data)
                if plan.ready is not None:
                    ready.set()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            finished.set()
        return plan

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any,
              timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout,
                          metadata=self._settings.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
