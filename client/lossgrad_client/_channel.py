"""Channel settings shared by LossClient and AsyncLossClient.

Target (one address, a ``dns:///`` name, or a list of addresses), channel options (message
size, per-call load balancing, retries on UNAVAILABLE through the gRPC service config) and
credentials (TLS, mutual TLS, bearer token) are worked out once here; each client then
opens a blocking or an asyncio channel with them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._wire import serialize_request, serialize_stream_request

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVICE_NAME = "lossgrad.v1.LossService"
METHOD_PREFIX = f"/{SERVICE_NAME}/"

DEFAULT_RETRIES = 4
# gRPC caps a retry policy's maxAttempts (the first attempt included) at 5.
MAX_RETRIES = 4
# Backoff before retry n (n = 1, 2, ...) is random in [0, min(INITIAL * MULTIPLIER**(n-1), MAX)].
RETRY_INITIAL_BACKOFF_S = 0.2
RETRY_MAX_BACKOFF_S = 5.0
RETRY_BACKOFF_MULTIPLIER = 2.0

# UNAVAILABLE: no server reachable, or one refusing calls while it shuts down. CANCELLED
# as a status from the server: gRPC servers answer calls that arrived but had not started
# when shutdown began with CANCELLED (grpc/grpc#41785); a call the client cancels
# itself is never retried.
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "CANCELLED")

TOKEN_METADATA_KEY = "authorization"

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ChannelSettings:
    """What a client needs to open its channel and make calls."""

    target: str
    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    metadata: Metadata | None  # sent with every call (the token on a plaintext channel)


def channel_settings(
    target: str | Sequence[str],
    *,
    max_message_bytes: int,
    retries: int,
    load_balancing: str,
    options: Sequence[tuple[str, Any]] | None,
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    token: str | None,
) -> ChannelSettings:
    """Check the client's arguments and turn them into :class:`ChannelSettings`.

    ``options`` are applied last, so they override the options set here.
    """
    if not isinstance(retries, int) or isinstance(retries, bool) or not (
            0 <= retries <= MAX_RETRIES):
        raise ValueError(f"retries must be an int in [0, {MAX_RETRIES}], got {retries!r}")
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.lb_policy_name": load_balancing,
        # On even with retries=0: gRPC's transparent retries (of calls that never left
        # the client or that the server refused before looking at them) stay on.
        "grpc.enable_retries": 1,
        "grpc.service_config": service_config(retries),
    }
    merged.update(options or ())
    tls = _tls_credentials(credentials, root_certificates, private_key, certificate_chain)
    metadata: Metadata | None = None
    if token is not None:
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("token must be a non-empty string without line breaks")
        if tls is None:  # call credentials need a secure channel: send it as metadata
            metadata = ((TOKEN_METADATA_KEY, f"Bearer {token}"),)
        else:  # "authorization: Bearer <token>" on every call
            tls = grpc.composite_channel_credentials(
                tls, grpc.access_token_call_credentials(token))
    return ChannelSettings(grpc_target(target), list(merged.items()), tls, metadata)


def service_config(retries: int) -> str:
    """The gRPC service config (JSON): retry every LossService method on UNAVAILABLE
    (and CANCELLED from a server shutting down, see :data:`RETRYABLE_STATUS_CODES`).

    Every method is idempotent (a pure function of the request), so a retried call
    cannot do anything twice. ``retries`` 0 leaves out the retry policy.
    """
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if retries:
        method["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
            "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
            "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
            "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
        }
    return json.dumps({"methodConfig": [method]})


def grpc_target(target: str | Sequence[str]) -> str:
    """A gRPC target string for ``target``.

    A string is used as is (``"host:port"``, ``"dns:///name:port"``, ...). A list or
    tuple of ``"ip:port"`` addresses (IPv6 in brackets: ``"[::1]:50051"``) becomes one
    ``ipv4:`` or ``ipv6:`` target over all of them.
    """
    if isinstance(target, str):
        return target
    if not isinstance(target, (list, tuple)) or not target:
        raise ValueError("target must be a string or a non-empty list of 'ip:port' addresses")
    families = set()
    addresses = []
    for address in target:
        ip, port = _split_address(address)
        families.add(ip.version)
        addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError(f"target mixes IPv4 and IPv6 addresses: {list(target)!r}")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _split_address(address: object) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"expected an 'ip:port' address, got {address!r}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"expected an 'ip:port' address, got {address!r} (for a host name that "
            "resolves to several servers, use 'dns:///name:port')") from None
    if not 0 < port <= 65535:
        raise ValueError(f"port out of range in {address!r}")
    return ip, port


def _tls_credentials(
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    pem = (root_certificates, private_key, certificate_chain)
    if credentials is not None:
        if any(value is not None for value in pem):
            raise ValueError("give either credentials or root_certificates/private_key/"
                             "certificate_chain, not both")
        return credentials
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    if all(value is None for value in pem):
        return None
    # root_certificates None: the system's roots (gRPC's bundled ones).
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


@dataclass(frozen=True)
class Methods:
    """The service's methods bound to one channel. A ``grpc.Channel`` and a
    ``grpc.aio.Channel`` bind them alike, so both clients share this. The Compute* methods
    use the hand-written codec (see ``_wire``): the request is built from the arrays with
    one copy, and the response comes back as bytes that the results view."""

    compute_loss: Any
    compute_gradient: Any
    compute_stream: Any
    list_losses: Any
    register: Any
    unregister: Any
    server_info: Any

    @classmethod
    def bind(cls, channel: Any) -> Methods:
        def unary(name: str, serializer: Any, deserializer: Any = None) -> Any:
            return channel.unary_unary(METHOD_PREFIX + name, request_serializer=serializer,
                                       response_deserializer=deserializer,
                                       _registered_method=True)

        return cls(
            compute_loss=unary("ComputeLoss", serialize_request),
            compute_gradient=unary("ComputeGradient", serialize_request),
            compute_stream=channel.stream_stream(
                METHOD_PREFIX + "ComputeStream", request_serializer=serialize_stream_request,
                _registered_method=True),
            list_losses=unary("ListLosses", pb.ListLossesRequest.SerializeToString,
                              pb.ListLossesResponse.FromString),
            register=unary("RegisterSharedMemoryRegion",
                           pb.RegisterSharedMemoryRegionRequest.SerializeToString,
                           pb.RegisterSharedMemoryRegionResponse.FromString),
            unregister=unary("UnregisterSharedMemoryRegion",
                             pb.UnregisterSharedMemoryRegionRequest.SerializeToString,
                             pb.UnregisterSharedMemoryRegionResponse.FromString),
            server_info=unary("GetServerInfo", pb.GetServerInfoRequest.SerializeToString,
                              pb.GetServerInfoResponse.FromString),
        )
