"""Build, start and stop the gRPC server."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from lossgrad_client import tune_allocator as client_tune_allocator
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from prometheus_client import start_http_server

from . import affinity, engine, plugin
from .grpc_server import ServerInfo, build_grpc_server
from .service import DEFAULT_MAX_STREAM_CHUNKS, SERVICE_NAME
from .shm import SharedMemoryConfig, SharedMemoryRegistry
from .shm_socket import SharedMemorySocket
from .telemetry import Telemetry

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_WORKERS = 2 * (os.cpu_count() or 1)  # kernels release the GIL
DEFAULT_GRACE_S = 5.0
DEFAULT_MAX_CONNECTION_AGE_S = 300.0

_log = logging.getLogger("lossgrad.server")


# glibc returns every block above 128 KiB to the kernel on free, so each request's
# tensors land on fresh pages and pay a page fault per 4 KiB (measured: 3x the latency
# of a bare gRPC echo at 8 MB). Keeping freed memory for reuse removes that cost.
# A request's bytes are received on a gRPC thread and used on a pool thread; with
# glibc's arena per thread, what one thread frees the other does not reuse, and the peak
# grows by about a request per thread (measured at 32 MB requests: peak - start 5-6x the
# request with one arena per thread, 3-4x with one arena shared by all).
_ARENAS = 1


def tune_allocator() -> bool:
    """Make glibc malloc reuse freed large blocks (up to 1 GiB) instead of unmapping them,
    in one arena shared by every thread started after the call (see
    :func:`lossgrad_client.tune_allocator`; the MALLOC_* environment variables take
    precedence). Returns False where there is no glibc."""
    return client_tune_allocator(arenas=_ARENAS)


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes of the server's certificate chain and private key; with ``client_ca``
    set, clients must present a certificate signed by it (mutual TLS)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str],
                   client_ca: str | os.PathLike[str] | None = None) -> TlsConfig:
        """Read the PEM files (``OSError`` when one cannot be read)."""
        ca = None if client_ca is None else Path(client_ca).read_bytes()
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)


class LossServer:
    """A running LossService server: the gRPC server, its health status and the
    plaintext health-only server (when ``health_port`` was given).

    ``stop(grace)`` turns readiness (``lossgrad.v1.LossService``) to NOT_SERVING, refuses
    new calls with UNAVAILABLE and lets calls in flight finish for ``grace`` seconds; the
    returned event is set once everything is stopped.
    """

    def __init__(self, server: grpc.Server, health: HealthServicer, telemetry: Telemetry,
                 health_server: grpc.Server | None, health_port: int | None,
                 metrics_server: WSGIServer | None,
                 shared_memory: SharedMemoryRegistry | None = None,
                 shared_memory_socket: SharedMemorySocket | None = None) -> None:
        self.grpc_server = server
        self.health = health
        self.telemetry = telemetry
        self.health_port = health_port
        self.metrics_port = None if metrics_server is None else metrics_server.server_port
        self._health_server = health_server
        self._metrics_server = metrics_server
        self.shared_memory = shared_memory
        self.shared_memory_socket = shared_memory_socket

    def stop(self, grace: float | None) -> threading.Event:
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        local = self.shared_memory_socket
        if local is not None:  # new connections and calls are refused from now on
            local.stop()
        stopped = self.grpc_server.stop(grace)
        done = threading.Event()

        def finish() -> None:
            stopped.wait()
            if local is not None:
                local.close()
            if self.shared_memory is not None:  # no call is left: unmap every region
                self.shared_memory.close()
            if self._health_server is not None:  # probes see NOT_SERVING until the end
                self._health_server.stop(0).wait()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            done.set()

        threading.Thread(target=finish, name="lossgrad-stop", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def create_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_elements: int | None = None,
    max_stream_elements: int | None = None,
    max_stream_chunks: int = DEFAULT_MAX_STREAM_CHUNKS,
    max_concurrent_rpcs: int | None = None,
    max_connection_age_s: float | None = None,
    reflection: bool = True,
    health_port: int | None = None,
    metrics_port: int | None = None,
    tls: TlsConfig | None = None,
    auth_token: str | None = None,
    warm: bool = True,
    kserve_api: bool = True,
    shared_memory: SharedMemoryConfig | None = None,
    plugins: bool | None = None,
    plugin_errors: str | None = None,
    io_cpu: int | None = None,
) -> tuple[LossServer, int]:
    """Start a LossService server on ``host:port`` and return it with the bound port.

    ``port=0`` binds a free port. With ``warm=True`` the engine compiles its kernels
    before the port opens, so the first request is not slow; readiness
    (``lossgrad.v1.LossService`` in grpc.health.v1) turns SERVING after that.
    ``health_port`` (0 for a free one) adds a plaintext server with only grpc.health.v1,
    for probes that cannot do TLS; it listens while the kernels warm. ``metrics_port``
    (0 for a free one) serves Prometheus metrics over HTTP at ``/metrics``. ``None``
    limits mean no limit; ``max_connection_age_s=None`` keeps connections open. The
    caller stops the server with ``server.stop(grace)``. ``kserve_api`` also serves the
    Open Inference Protocol (``inference.GRPCInferenceService``) on the same port.
    ``shared_memory`` turns on the shared-memory transport (:mod:`lossgrad.shm`) with its
    directory and limits.
    ``plugins`` and ``plugin_errors`` are those of :func:`lossgrad.plugin.load` (the
    first load in a process decides); a broken plugin raises ``PluginError`` unless
    ``plugin_errors="skip"``. ``io_cpu`` pins the threads that carry calls, the whole
    process's Python and gRPC threads, to that CPU once the server has started
    (:mod:`lossgrad.affinity`; for a process of its own, as ``lossgrad serve`` is).
    """
    for name, value in (("port", port), ("health_port", health_port),
                        ("metrics_port", metrics_port)):
        if value is not None and not 0 <= value <= 65535:  # gRPC would wrap 99999 to 34463
            raise ValueError(f"{name} must be in [0, 65535], got {value}")
    for name, value in (("max_workers", max_workers), ("max_message_bytes", max_message_bytes),
                        ("max_elements", max_elements),
                        ("max_stream_elements", max_stream_elements),
                        ("max_stream_chunks", max_stream_chunks),
                        ("max_concurrent_rpcs", max_concurrent_rpcs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_connection_age_s is not None and max_connection_age_s <= 0:
        raise ValueError(f"max_connection_age_s must be > 0, got {max_connection_age_s}")
    if auth_token is not None and not auth_token:
        raise ValueError("auth_token must not be empty")
    if io_cpu is not None:
        affinity.check_cpu(io_cpu)
    tune_allocator()
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    telemetry = Telemetry()
    registry = None if shared_memory is None else SharedMemoryRegistry(shared_memory)
    health_server, health_bound, metrics_server = None, None, None
    local: SharedMemorySocket | None = None
    if health_port is not None:
        health_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="lossgrad-health"),
            options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_bound = _bind(health_server, host, health_port, None)
        health_server.start()
    try:
        plugins_found = plugin.load(enabled=plugins, errors=plugin_errors)
        if warm:
            engine.warmup()
        info = ServerInfo(
            limits=pb.ServerLimits(max_message_bytes=max_message_bytes,
                                   max_elements=max_elements or 0,
                                   max_concurrent_rpcs=max_concurrent_rpcs or 0,
                                   max_stream_elements=max_stream_elements or 0,
                                   max_stream_chunks=max_stream_chunks,
                                   max_shared_memory_regions=shared_memory.max_regions
                                   if shared_memory else 0,
                                   max_shared_memory_bytes=shared_memory.max_bytes
                                   if shared_memory else 0),
            features=pb.ServerFeatures(
                reflection=reflection, tls=tls is not None,
                mutual_tls=tls is not None and tls.client_ca is not None,
                auth=auth_token is not None, metrics=metrics_port is not None,
                kserve=kserve_api, streaming=True,
                hessian=True, shared_memory=shared_memory is not None,
                plugins=plugins_found.to_proto()),
            telemetry=telemetry)
        server, handlers = build_grpc_server(
            max_workers=max_workers, max_message_bytes=max_message_bytes,
            max_elements=max_elements, max_concurrent_rpcs=max_concurrent_rpcs,
            max_connection_age_s=max_connection_age_s, reflection=reflection, health=health,
            telemetry=telemetry, server_info=info, auth_token=auth_token,
            kserve_api=kserve_api, shared_memory=registry)
        bound = _bind(server, host, port, tls)
        if shared_memory is not None and shared_memory.socket:
            name = shared_memory.socket.replace("{port}", str(bound))
            try:
                local = SharedMemorySocket(
                    os.path.join(shared_memory.directory, name), handlers,
                    max_message_bytes=max_message_bytes, auth_token=auth_token)
            except OSError as err:
                server.stop(None)
                raise OSError(f"cannot listen on the shared-memory socket {name!r} in "
                              f"{shared_memory.directory}: {err}") from err
            info.features.shared_memory_socket = name
        if metrics_port is not None:
            try:
                metrics_server, _ = start_http_server(metrics_port, host, telemetry.registry)
            except OSError as err:
                server.stop(None)
                raise OSError(f"cannot bind {_host_for_address(host)}:{metrics_port} "
                              f"for metrics: {err}") from err
        server.start()
        if io_cpu is not None:
            pinned = affinity.pin_call_threads(io_cpu)
            _log.info("%d call-carrying threads pinned to CPU %d", pinned, io_cpu)
    except BaseException:
        if local is not None:
            local.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if health_server is not None:
            health_server.stop(None)
        if registry is not None:
            registry.close()
        raise
    health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return LossServer(server, health, telemetry, health_server, health_bound,
                      metrics_server, registry, local), bound


def _bind(server: grpc.Server, host: str, port: int, tls: TlsConfig | None) -> int:
    address = f"{_host_for_address(host)}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.credentials())
    except RuntimeError as err:
        server.stop(None)
        raise OSError(f"cannot bind {address}: {err}") from err
    if bound == 0:
        server.stop(None)
        raise OSError(f"cannot bind {address}")
    return int(bound)


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    grace: float = DEFAULT_GRACE_S,
    on_ready: Callable[[str, int], None] | None = None,
    **options: Any,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop: readiness turns NOT_SERVING, new calls
    get UNAVAILABLE, and calls in flight finish for up to ``grace`` s.

    ``options`` are those of :func:`create_server`. ``on_ready(host, port)`` is called
    once the server accepts calls. Must run in the main thread (signal handlers).
    """
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        _log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server, bound = create_server(host, port, **options)
        try:
            _log.info("serving on %s:%d", host, bound)
            if server.health_port is not None:
                _log.info("grpc.health.v1 only, in plaintext, on %s:%d", host,
                          server.health_port)
            if server.metrics_port is not None:
                _log.info("Prometheus metrics on http://%s:%d/metrics",
                          _host_for_address(host), server.metrics_port)
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
