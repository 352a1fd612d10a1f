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
    Methods,
    channel_settings,
)
from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._requests import (
    LIST_LOSSES_REQUEST,
    compute_request,
    gradient_result,
    loss_infos,
    loss_result,
    with_hessian,
)
from ._shm import (
    Placement,
    Segment,
    SharedMemoryOptions,
    check_gradient_out,
    register_request,
    transport,
    unregister_request,
)
from ._shm_socket import COMPUTE_GRADIENT, COMPUTE_LOSS, SharedMemorySocketLink, SocketDown
from ._stream import (
    DEFAULT_CHUNK_BYTES,
    Progress,
    StreamPlan,
    stream_sizes,
    streams,
    with_out,
)
from ._types import GradientResult, LossInfo, LossResult
from ._wire import ComputeRequest, StreamRequest, serialize_request
from .errors import LossgradError, NotFoundError, from_rpc_error

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
    ``stream_threshold_bytes`` (default: 32 MiB, at most half of ``max_message_bytes``) go by the
    ComputeStream RPC in chunks of ``stream_chunk_bytes`` (at most half of
    ``max_message_bytes``), with the same results. ``shared_memory`` (True, or
    :class:`SharedMemoryOptions`) sends tensors through POSIX shared memory to a server
    on the same host that has it on (see ``shared_array`` and ``out``).
"""

SHARED_MEMORY_DOC = """
        ``shape`` and ``dtype`` (float32, float64, int32 or int64) as in ``np.zeros``.
        Fill it in place and pass it (or a contiguous slice of it) as ``predictions``,
        ``targets`` or ``sample_weight``: the server reads it where it is, with no copy;
        pass one of the predictions' shape as ``out`` and the server's kernel
        writes the gradient into it. It stays valid until the client is closed (after
        that it is plain memory that can no longer be sent). Needs
        ``shared_memory``; thread-safe.
"""

_NOT_REGISTERED = "SHARED_MEMORY_REGION_NOT_FOUND"
_UNREGISTER_TIMEOUT_S = 5.0


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
        shared_memory: bool | SharedMemoryOptions = False,
    ) -> None:
        self._shm = transport(shared_memory)
        self._token = token
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
        self._rpc = Methods.bind(self._channel)

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
        """Close the channel; calls in flight are cancelled. With shared memory, the
        client's regions are unregistered and removed first."""
        if self._shm is not None:
            self._unregister_all(self._shm.close())
        self._channel.close()

    def shared_array(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> Any:
        """Return a new zeroed array in shared memory, for calls without copies."""
        if self._shm is None:
            raise LossgradError("shared_array needs a client made with shared_memory=True")
        return self._shm.shared_array(shape, dtype)

    shared_array.__doc__ = (shared_array.__doc__ or "") + SHARED_MEMORY_DOC

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
        if self._shm is not None and not stream:
            placement = self._shm.prepare(request, gradient=False, gradient_out=None)
            if placement is not None:
                try:
                    data = self._call_placed(self._rpc.compute_loss, COMPUTE_LOSS, placement,
                                             timeout)
                    return loss_result(data, request, placement.read)
                finally:
                    self._finish(placement)
        if self._streams(request, stream):
            return self._stream(request, False, timeout, None, progress).loss_result()
        return loss_result(self._call(self._rpc.compute_loss, request, timeout), request)

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
        shape and dtype) receives it instead of a new array, and is returned as it: through
        shared memory, a :meth:`shared_array` ``out`` is written by the server's kernel
        itself. Without ``out``, the gradient is a read-only view of the response, or
        (through shared memory) a new array copied out of the client's region.

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
        if self._shm is not None and not stream:
            placement = self._shm.prepare(
                request, gradient=True, gradient_out=check_gradient_out(out, request.predictions))
            if placement is not None:
                try:
                    data = self._call_placed(self._rpc.compute_gradient, COMPUTE_GRADIENT,
                                             placement, timeout)
                    return gradient_result(data, request, placement.read)
                finally:
                    self._finish(placement)
        if self._streams(request, stream):
            return self._stream(request, True, timeout, out, progress).gradient_result()
        result = gradient_result(self._call(self._rpc.compute_gradient, request, timeout), request)
        return with_out(result, out)

    def list_losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """Return the server's catalog: every loss, its inputs and its parameters."""
        return loss_infos(self._call(self._rpc.list_losses, LIST_LOSSES_REQUEST, timeout))

    def _streams(self, request: ComputeRequest, stream: bool | None) -> bool:
        return streams(request, stream, self._stream_threshold)

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
            for data in self._rpc.compute_stream(
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

    def _call_placed(self, method: grpc.UnaryUnaryMultiCallable, number: int,
                     placement: Placement, timeout: float | None) -> Any:
        """Send a request that uses shared memory, registering its segments first; once
        more after registering them again if the server lost them (it restarted). It
        goes over the server's shared-memory socket when there is one, else over gRPC."""
        assert self._shm is not None
        for attempt in (0, 1):
            self._register_all([s for s in placement.used if not s.registered], timeout)
            link = self._shm.link if self._shm.link_known else self._find_socket(timeout)
            try:
                if link is not None:
                    try:
                        return link.call(number, serialize_request(placement.request),
                                         timeout)
                    except SocketDown:
                        pass  # not computed: gRPC carries it
                return self._call(method, placement.request, timeout)
            except NotFoundError as err:
                if err.reason != _NOT_REGISTERED or attempt or self._shm is None:
                    raise
                self._shm.forget_registrations()
        raise AssertionError("unreachable")

    def _find_socket(self, timeout: float | None) -> SharedMemorySocketLink | None:
        """Ask the server for its shared-memory socket (once)."""
        assert self._shm is not None
        try:
            info = self._call(self._rpc.server_info, pb.GetServerInfoRequest(), timeout)
            name = info.features.shared_memory_socket
        except LossgradError:
            name = ""  # an older server, or none reachable: gRPC only
        return self._shm.use_socket(name, self._token)

    def _register_all(self, segments: list[Segment], timeout: float | None) -> None:
        for segment in segments:
            self._call(self._rpc.register, register_request(segment), timeout)
            segment.registered = True

    def _finish(self, placement: Placement) -> None:
        assert self._shm is not None
        self._shm.release(placement)
        self._unregister_all(placement.retired)

    def _unregister_all(self, segments: list[Segment]) -> None:
        """Unregister and remove segments; a server that is gone does not stop that."""
        for segment in segments:
            if segment.registered:
                try:
                    self._call(self._rpc.unregister, unregister_request(segment),
                               _UNREGISTER_TIMEOUT_S)
                except LossgradError:
                    pass  # unreachable or restarted: it has no such region anyway
            segment.destroy()

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any,
              timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout,
                          metadata=self._settings.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
