"""Build, start and stop the gRPC server."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from types import FrameType

import grpc

from . import engine
from .service import SERVICE_NAME, LossService, method_handlers

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_WORKERS = 2 * (os.cpu_count() or 1)  # kernels release the GIL
DEFAULT_GRACE_S = 5.0

_log = logging.getLogger("lossgrad.server")


# glibc returns every block above 128 KiB to the kernel on free, so each request's
# tensors land on fresh pages and pay a page fault per 4 KiB (measured: 3x the latency
# of a bare gRPC echo at 8 MB). Keeping freed memory for reuse removes that cost.
# A request's bytes are received on a gRPC thread and used on a pool thread; with
# glibc's arena per thread, what one thread frees the other does not reuse, and the peak
# grows by about a request per thread (measured at 32 MB requests: peak - start 5-6x the
# request with one arena per thread, 3-4x with one arena shared by all).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_FREED_BYTES = 1 << 30
_ARENAS = 1


def tune_allocator() -> bool:
    """Make glibc malloc reuse freed large blocks (up to 1 GiB) instead of unmapping them,
    in one arena shared by every thread started after the call.

    Environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (and
    MALLOC_ARENA_MAX for the arenas) take precedence. Returns False where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    tuned = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        tuned = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED_BYTES)
                     and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    if "MALLOC_ARENA_MAX" not in os.environ:
        tuned = bool(mallopt(_M_ARENA_MAX, _ARENAS)) and tuned
    return tuned


def create_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    warm: bool = True,
) -> tuple[grpc.Server, int]:
    """Start a LossService server on ``host:port`` and return it with the bound port.

    ``port=0`` binds a free port. With ``warm=True`` the engine compiles its kernels
    before the port opens, so the first request is not slow. The caller stops the
    server with ``server.stop(grace)``.
    """
    if not 0 <= port <= 65535:  # gRPC would silently wrap 99999 to 34463
        raise ValueError(f"port must be in [0, 65535], got {port}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
    tune_allocator()
    if warm:
        engine.warmup()
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A second server on a taken port must fail, not share it.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lossgrad"),
        options=options,
    )
    handlers = method_handlers(LossService())
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    address = f"{_host_for_address(host)}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        server.stop(None)
        raise OSError(f"cannot bind {address}: {err}") from err
    if bound == 0:
        server.stop(None)
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, bound


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    warm: bool = True,
    grace: float = DEFAULT_GRACE_S,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop, letting running calls finish for ``grace`` s.

    ``on_ready(host, port)`` is called once the server accepts calls.
    Must run in the main thread (signal handlers).
    """
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        _log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server, bound = create_server(host, port, max_workers=max_workers,
                                      max_message_bytes=max_message_bytes, warm=warm)
        try:
            _log.info("serving on %s:%d", host, bound)
            if on_ready is not None:
                on_ready(host, bound)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop(grace).wait()
            _log.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _host_for_address(host: str) -> str:
    """Bracket a bare IPv6 address for a ``host:port`` string."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host
