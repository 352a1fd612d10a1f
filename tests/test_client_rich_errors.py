"""The client reads ``reason`` and ``field`` from the google.rpc.Status that a server puts
in ``grpc-status-details-bin`` (ErrorInfo, BadRequest), when googleapis-common-protos is
importable, and otherwise from the ``lossgrad-error-*`` trailers.

A small servicer sends a Status and trailers that disagree, so each test can tell which
one the client read.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from lossgrad_client import AsyncLossClient, InvalidArgumentError, LossClient
from lossgrad_client import errors as client_errors

error_details_pb2 = pytest.importorskip("google.rpc.error_details_pb2")
status_pb2 = pytest.importorskip("google.rpc.status_pb2")

pytestmark = pytest.mark.e2e


def _status_bytes() -> bytes:
    info = error_details_pb2.ErrorInfo(reason="FROM_STATUS", domain="lossgrad")
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="status.field", description="bad")])
    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                               message="rejected")
    for detail in (info, bad):
        status.details.add().Pack(detail)
    return bytes(status.SerializeToString())


def _reject(request: Any, context: grpc.ServicerContext) -> None:
    context.set_trailing_metadata((
        (client_errors.STATUS_DETAILS_KEY, _status_bytes()),
        (client_errors.REASON_KEY, "FROM_METADATA"),
        (client_errors.FIELD_KEY, "metadata.field"),
    ))
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rejected")


@pytest.fixture(scope="module")
def rejecting_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "lossgrad.v1.LossService", {"ListLosses": grpc.unary_unary_rpc_method_handler(_reject)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def test_reason_and_field_come_from_the_status(rejecting_address: str) -> None:
    with LossClient(rejecting_address, timeout=30) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.list_losses()
    assert (info.value.reason, info.value.field) == ("FROM_STATUS", "status.field")
    assert info.value.message == "rejected"


def test_async_client_reads_the_status_too(rejecting_address: str) -> None:
    async def call() -> None:
        async with AsyncLossClient(rejecting_address, timeout=30) as client:
            await client.list_losses()

    with pytest.raises(InvalidArgumentError) as info:
        asyncio.run(call())
    assert (info.value.reason, info.value.field) == ("FROM_STATUS", "status.field")


def test_without_the_google_rpc_protos_the_trailers_are_used(
        rejecting_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.rpc.status_pb2", None)  # import fails: as if
    # googleapis-common-protos were not installed
    with LossClient(rejecting_address, timeout=30) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.list_losses()
    assert (info.value.reason, info.value.field) == ("FROM_METADATA", "metadata.field")


def test_a_malformed_status_falls_back_to_the_trailers() -> None:
    assert client_errors._rich_status(b"\xff\xff\xff") == (None, None)


def test_the_real_server_agrees_on_both_paths(client: LossClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def reject() -> InvalidArgumentError:
        with pytest.raises(InvalidArgumentError) as info:
            client.compute_loss("mse", [1.0, 2.0], [1.0])
        return info.value

    rich = reject()
    monkeypatch.setitem(sys.modules, "google.rpc.status_pb2", None)
    plain = reject()
    assert rich.reason is not None and rich.field is not None
    assert (rich.reason, rich.field) == (plain.reason, plain.field)


def test_importing_the_client_does_not_import_google_rpc() -> None:
    code = "import sys, lossgrad_client\nassert 'google.rpc' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
