"""Shared fixtures: one real server on a loopback port for the whole session.

The server runs in-process (``create_server("127.0.0.1", 0)``), so the end-to-end tests
exercise the real wire: client conversion, gRPC, the servicer, the engine, and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from lossgrad._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from lossgrad.server import LossServer, create_server
from lossgrad_client import LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def server_address() -> Iterator[str]:
    """``host:port`` of a LossService server on a free loopback port."""
    server, port = create_server("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="session")
def client(server_address: str) -> Iterator[LossClient]:
    """A LossClient connected to the session's server."""
    with LossClient(server_address, timeout=CALL_TIMEOUT_S) as loss_client:
        yield loss_client


@pytest.fixture(scope="session")
def stub(server_address: str) -> Iterator[pb_grpc.LossServiceStub]:
    """A raw generated stub, for hand-built messages the client would refuse to send."""
    channel = grpc.insecure_channel(server_address)
    try:
        yield pb_grpc.LossServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="session")
def kserve_stub(server_address: str) -> Iterator[kserve_grpc.GRPCInferenceServiceStub]:
    """A stub of the session server's Open Inference Protocol (KServe v2) API."""
    channel = grpc.insecure_channel(server_address)
    try:
        yield kserve_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[LossServer, str]]]:
    """Start a server with the given create_server options; stop it at teardown."""
    servers: list[LossServer] = []

    def _start(**options: Any) -> tuple[LossServer, str]:
        server, port = create_server("127.0.0.1", 0, **options)
        servers.append(server)
        return server, f"127.0.0.1:{port}"

    yield _start
    for server in servers:
        server.stop(0).wait(30)
