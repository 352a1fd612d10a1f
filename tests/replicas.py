"""Replicas of the server for the client tests: the real servicer in a plain grpc.server,
with an interceptor that counts the calls each replica receives.

No mock: the servicer is :class:`lossgrad.service.LossService`, registered as the real
server registers it; only the counting is added.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from lossgrad.service import SERVICE_NAME, LossService, method_handlers


class CountingInterceptor(grpc.ServerInterceptor):
    """Counts the calls that reach the server, by method name (``"ComputeGradient"``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        with self._lock:
            self._counts[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return continuation(handler_call_details)

    def count(self, method: str | None = None) -> int:
        """Calls of ``method`` so far (of every method with None)."""
        with self._lock:
            return self._counts[method] if method else sum(self._counts.values())


class Replica:
    """One LossService server on 127.0.0.1 with a call counter; ``port=0`` picks one."""

    def __init__(self, port: int = 0, *, interceptors: tuple[Any, ...] = ()) -> None:
        self.counter = CountingInterceptor()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  interceptors=(self.counter, *interceptors),
                                  options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(LossService())),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, f"cannot bind 127.0.0.1:{port}"
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 0) -> None:
        self.server.stop(grace).wait()


def free_port() -> int:
    """A loopback port that was free a moment ago (for a server started later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
