"""The gRPC server object of ``create_server``: its options and interceptors, the
LossService handlers (measured and logged), the other services (KServe, health,
reflection), and the GetServerInfo answer."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc_reflection.v1alpha.reflection as grpc_reflection
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import HealthServicer
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

from . import __version__, kserve, wire
from .auth import TokenAuthInterceptor
from .concurrency import CallCountingExecutor, ConcurrencyLimitInterceptor
from .errors import TOO_MANY_CONCURRENT_CALLS
from .service import SERVICE_NAME, SUPPORTED_DTYPES, LossService, method_handlers
from .shm import SharedMemoryRegistry
from .telemetry import Telemetry

# Calls in flight when a connection reaches its age get this long to finish.
CONNECTION_AGE_GRACE_S = 30.0


def build_grpc_server(*, max_workers: int, max_message_bytes: int, max_elements: int | None,
           max_concurrent_rpcs: int | None, max_connection_age_s: float | None,
           reflection: bool, health: HealthServicer, telemetry: Telemetry,
           server_info: ServerInfo, auth_token: str | None, kserve_api: bool,
           shared_memory: SharedMemoryRegistry | None = None,
           ) -> tuple[grpc.Server, dict[str, grpc.RpcMethodHandler]]:
    """The gRPC server, and its (measured) LossService handlers by method name."""
    options: list[tuple[str, int]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A second server on a taken port must fail, not share it.
        ("grpc.so_reuseport", 0),
    ]
    if max_connection_age_s is not None:  # clients reconnect, and so re-resolve the name
        options += [("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(CONNECTION_AGE_GRACE_S * 1000))]
    pool = CallCountingExecutor(max_workers=max_workers, thread_name_prefix="lossgrad")
    interceptors: list[grpc.ServerInterceptor] = []
    if auth_token is not None:
        interceptors.append(TokenAuthInterceptor(auth_token))
    if max_concurrent_rpcs is not None:
        refused = telemetry.refused
        interceptors.append(ConcurrencyLimitInterceptor(
            max_concurrent_rpcs, pool,
            lambda method: refused.labels(method, TOO_MANY_CONCURRENT_CALLS).inc()))
    server = grpc.server(pool, interceptors=interceptors, options=options)
    handlers = {
        name: _observed(telemetry, name, handler)
        for name, handler in method_handlers(
            LossService(max_elements=max_elements, server_info=server_info,
                        max_stream_elements=server_info.limits.max_stream_elements or None,
                        max_stream_chunks=server_info.limits.max_stream_chunks,
                        shared_memory=shared_memory)).items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    services = [SERVICE_NAME, HEALTH_SERVICE_NAME, grpc_reflection.SERVICE_NAME]
    if kserve_api:
        _add_kserve(server, health, telemetry, max_elements)
        services.append(kserve.SERVICE_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection:
        grpc_reflection.enable_server_reflection(services, server)
    return server, handlers


def _add_kserve(server: grpc.Server, health: HealthServicer, telemetry: Telemetry,
                max_elements: int | None) -> None:
    """Register inference.GRPCInferenceService; it is ready when lossgrad.v1.LossService
    is SERVING in ``health`` (kernels warmed, not shutting down)."""
    readiness = health_pb2.HealthCheckRequest(service=SERVICE_NAME)

    def ready() -> bool:
        # The service is always registered in ``health``, so Check needs no context.
        return bool(health.Check(readiness, None).status
                    == health_pb2.HealthCheckResponse.SERVING)

    service = kserve.InferenceService(ready=ready, max_elements=max_elements)
    handlers = {name: _observed(telemetry, name, handler)
                for name, handler in kserve.method_handlers(service).items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(kserve.SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(kserve.SERVICE_NAME, handlers)


def _observed(telemetry: Telemetry, name: str,
              handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A unary or stream-stream handler whose calls are measured and logged."""
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            telemetry.observe_stream(name, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        telemetry.observe(name, handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class ServerInfo:
    """Builds the GetServerInfo answer: the fixed configuration and the live counts."""

    limits: pb.ServerLimits
    features: pb.ServerFeatures
    telemetry: Telemetry

    def __call__(self) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            version=__version__,
            supported_dtypes=[wire.data_type(wire.numpy_dtype(name))
                              for name in SUPPORTED_DTYPES],
            limits=self.limits, features=self.features,
            loss_statistics=[
                pb.LossStatistics(loss=name, calls=calls, failed_calls=failed)
                for name, (calls, failed) in sorted(self.telemetry.loss_counts().items())])
