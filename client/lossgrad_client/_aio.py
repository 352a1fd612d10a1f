"""AsyncLossClient: the asyncio (grpc.aio) client of lossgrad.v1.LossService.

It takes the arguments of :class:`LossClient` and has the same methods, awaited; the
requests are built and the responses read by the same code (:mod:`._requests`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from ._channel import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_RETRIES, Methods, channel_settings
from ._client import CLIENT_ARGUMENTS_DOC, SHARED_MEMORY_DOC
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
from ._wire import ComputeRequest, serialize_request
from .errors import LossgradError, NotFoundError, from_rpc_error

_NOT_REGISTERED = "SHARED_MEMORY_REGION_NOT_FOUND"
_UNREGISTER_TIMEOUT_S = 5.0

_Client = TypeVar("_Client", bound="AsyncLossClient")


class AsyncLossClient:
    """asyncio client of a lossgrad server: :class:`LossClient`'s methods, awaited.

    Create it, use it and close it on one event loop: ``async with AsyncLossClient(...)
    as client:`` or ``await client.close()``. Arrays in results are read-only views of
    the response bytes. Every error is a :class:`lossgrad_client.LossgradError`.
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
            self._channel = grpc.aio.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(settings.target, settings.credentials,
                                                    options=settings.options)
        self._rpc = Methods.bind(self._channel)

    async def __aenter__(self: _Client) -> _Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.target!r})"

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. With shared memory, the
        client's regions are unregistered and removed first."""
        if self._shm is not None:
            await self._unregister_all(self._shm.close())
        await self._channel.close()

    def shared_array(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> Any:
        """Return a new zeroed array in shared memory, for calls without copies (not a
        coroutine: it is registered with the server at its first use)."""
        if self._shm is None:
            raise LossgradError("shared_array needs a client made with shared_memory=True")
        return self._shm.shared_array(shape, dtype)

    shared_array.__doc__ = (shared_array.__doc__ or "") + SHARED_MEMORY_DOC

    async def compute_loss(
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
        """Compute a loss on the server; see :meth:`LossClient.compute_loss`."""
        request = compute_request(loss, predictions, targets, reduction, sample_weight,
                                  allow_nonfinite, params)
        if self._shm is not None and not stream:
            placement = self._shm.prepare(request, gradient=False, gradient_out=None)
            if placement is not None:
                try:
                    data = await self._call_placed(self._rpc.compute_loss, COMPUTE_LOSS,
                                                   placement, timeout)
                    return loss_result(data, request, placement.read)
                finally:
                    await self._finish(placement)
        if self._streams(request, stream):
            plan = await self._stream(request, False, timeout, None, progress)
            return plan.loss_result()
        return loss_result(await self._call(self._rpc.compute_loss, request, timeout), request)

    async def compute_gradient(
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
        """Compute a loss, its gradient and optionally its diagonal Hessian; see
        :meth:`LossClient.compute_gradient`."""
        request = with_hessian(
            compute_request(loss, predictions, targets, reduction, sample_weight,
                            allow_nonfinite, params), hessian, hessian_floor, hessian_constant)
        if self._shm is not None and not stream:
            placement = self._shm.prepare(
                request, gradient=True, gradient_out=check_gradient_out(out, request.predictions))
            if placement is not None:
                try:
                    data = await self._call_placed(self._rpc.compute_gradient, COMPUTE_GRADIENT,
                                                   placement, timeout)
                    return gradient_result(data, request, placement.read)
                finally:
                    await self._finish(placement)
        if self._streams(request, stream):
            plan = await self._stream(request, True, timeout, out, progress)
            return plan.gradient_result()
        result = gradient_result(await self._call(self._rpc.compute_gradient, request, timeout),
                                 request)
        return with_out(result, out)

    async def list_losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        """Return the server's catalog; see :meth:`LossClient.list_losses`."""
        return loss_infos(await self._call(self._rpc.list_losses, LIST_LOSSES_REQUEST, timeout))

    def _streams(self, request: ComputeRequest, stream: bool | None) -> bool:
        return streams(request, stream, self._stream_threshold)

    async def _stream(self, request: ComputeRequest, gradient: bool, timeout: float | None,
                      out: Any, progress: Progress | None) -> StreamPlan:
        """Run one ComputeStream call: the chunks are written by a task of their own
        while the responses are read here."""
        plan = StreamPlan(request, gradient=gradient, chunk_bytes=self._chunk_bytes, out=out,
                          progress=progress)
        call = self._rpc.compute_stream(timeout=self._timeout if timeout is None else timeout,
                                    metadata=self._settings.metadata)

        async def write() -> None:
            for message in plan.messages():
                await call.write(message)
            await call.done_writing()

        writer: asyncio.Task[None] | None = None
        try:
            await call.write(plan.header)
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    break
                plan.receive(data)
                if plan.ready is not None and writer is None:
                    writer = asyncio.create_task(write())
            if writer is not None:
                await writer
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            if writer is not None and not writer.done():
                writer.cancel()
        return plan

    async def _call_placed(self, method: grpc.aio.UnaryUnaryMultiCallable, number: int,
                           placement: Placement, timeout: float | None) -> Any:
        """See :meth:`LossClient._call_placed`; a call over the shared-memory socket
        waits on a worker thread."""
        assert self._shm is not None
        for attempt in (0, 1):
            for segment in [s for s in placement.used if not s.registered]:
                await self._call(self._rpc.register, register_request(segment), timeout)
                segment.registered = True
            link = self._shm.link if self._shm.link_known else await self._find_socket(timeout)
            try:
                if link is not None:
                    try:
                        return await asyncio.to_thread(
                            link.call, number, serialize_request(placement.request), timeout)
                    except SocketDown:
                        pass  # not computed: gRPC carries it
                return await self._call(method, placement.request, timeout)
            except NotFoundError as err:
                if err.reason != _NOT_REGISTERED or attempt or self._shm is None:
                    raise
                self._shm.forget_registrations()
        raise AssertionError("unreachable")

    async def _find_socket(self, timeout: float | None) -> SharedMemorySocketLink | None:
        """See :meth:`LossClient._find_socket`."""
        assert self._shm is not None
        try:
            info = await self._call(self._rpc.server_info, pb.GetServerInfoRequest(), timeout)
            name = info.features.shared_memory_socket
        except LossgradError:
            name = ""
        return self._shm.use_socket(name, self._token)

    async def _finish(self, placement: Placement) -> None:
        assert self._shm is not None
        self._shm.release(placement)
        await self._unregister_all(placement.retired)

    async def _unregister_all(self, segments: list[Segment]) -> None:
        for segment in segments:
            if segment.registered:
                try:
                    await self._call(self._rpc.unregister, unregister_request(segment),
                                     _UNREGISTER_TIMEOUT_S)
                except LossgradError:
                    pass  # unreachable or restarted: it has no such region anyway
            segment.destroy()

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any,
                    timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout if timeout is None else timeout,
                                metadata=self._settings.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
