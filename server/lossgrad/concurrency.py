"""The concurrent-call limit, enforced where the refusal can say what the limit is.

gRPC's own ``maximum_concurrent_rpcs`` refuses the extra call with a fixed text
("Concurrent RPC limit exceeded!"). The server counts calls the way gRPC does instead:
gRPC submits exactly one task to the server's thread pool per admitted call and counts
the call as active until that task's future is done, so an executor that counts its
outstanding futures knows the same number, and a call cancelled while it waited in the
queue still ends its task. An interceptor, which gRPC runs in its serving thread before
the call reaches the pool, refuses a call when the count is at the limit, with
RESOURCE_EXHAUSTED, the limit in the message and the reason ``TOO_MANY_CONCURRENT_CALLS``.

The refusal runs on a pool of its own, so that it is sent at once even when every
worker is busy. Health checks and reflection are never refused: a busy server must not
look dead to its probes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from .auth import OPEN_PREFIXES
from .errors import TOO_MANY_CONCURRENT_CALLS, ResourceExhaustedError
from .status import abort


class CallCountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that knows how many submitted tasks have not finished."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> futures.Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        with self._count_lock:
            self._outstanding += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: futures.Future[Any]) -> None:
        with self._count_lock:
            self._outstanding -= 1


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse a call with RESOURCE_EXHAUSTED while ``limit`` calls are in the pool."""

    def __init__(self, limit: int, pool: CallCountingExecutor,
                 on_refused: Callable[[str], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._pool = pool
        self._on_refused = on_refused
        self._refusal_pool = futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lossgrad-refuse")
        self._message = (f"the server is at its limit of {limit} concurrent calls "
                         "(max_concurrent_rpcs); retry later")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (handler is None or self._pool.outstanding < self._limit
                or handler_call_details.method.startswith(OPEN_PREFIXES)):
            return handler
        method = handler_call_details.method
        if self._on_refused is not None:
            self._on_refused(method)
        return self._refusal(handler, method)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler that refuses at once. It takes the request as a stream, which it never
        reads, so that the refusal does not wait for a large request to arrive; the
        response side keeps the kind of ``handler``."""
        error = ResourceExhaustedError("", self._message, TOO_MANY_CONCURRENT_CALLS)

        def refuse(_requests: Any, context: grpc.ServicerContext) -> None:
            abort(context, error, method)

        refuse.experimental_thread_pool = self._refusal_pool  # type: ignore[attr-defined]
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.stream_unary_rpc_method_handler(refuse)
