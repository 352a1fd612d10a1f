"""The shared-memory socket: Compute calls whose tensors are in shared memory, over a
Unix socket in the shared-memory directory, against a real server on a loopback port.

Results must be bit-identical to the gRPC path's, errors must carry the same codes,
reasons and fields, bad frames must get an error frame (never a hang, never a crash of
the server), and the client must fall back to gRPC when the socket cannot be used.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad.cli import main
from lossgrad.server import create_server
from lossgrad.shm import SharedMemoryConfig
from lossgrad_client import (
    InvalidArgumentError,
    LossClient,
    SharedMemoryOptions,
    UnauthenticatedError,
)
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._shm_socket import COMPUTE_GRADIENT, SharedMemorySocketLink

TIMEOUT_S = 60.0
HELLO = struct.Struct("<4sBI")
REQUEST = struct.Struct("<B3xId")
RESPONSE = struct.Struct("<B3xI")


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def served(directory: Path) -> Iterator[tuple[Any, int]]:
    server, port = create_server(shared_memory=SharedMemoryConfig(str(directory)),
                                 max_message_bytes=1 << 20)
    try:
        yield server, port
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def client(served: tuple[Any, int], directory: Path) -> Iterator[LossClient]:
    with LossClient(f"127.0.0.1:{served[1]}", timeout=TIMEOUT_S,
                    shared_memory=SharedMemoryOptions(directory=str(directory))) as c:
        yield c


def _socket_path(served: tuple[Any, int], directory: Path) -> Path:
    return directory / f"lossgrad-{served[1]}.sock"


def _shared(client: LossClient, array: np.ndarray) -> np.ndarray:
    shared = client.shared_array(array.shape, array.dtype)
    shared[...] = array
    return shared


def _connect(path: Path, token: bytes = b"") -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT_S)
    conn.connect(str(path))
    conn.sendall(HELLO.pack(b"LGSM", 1, len(token)) + token)
    return conn


def _frame(conn: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < RESPONSE.size:
        part = conn.recv(RESPONSE.size - len(header))
        assert part, "the server closed the connection before its answer"
        header += part
    code, length = RESPONSE.unpack(header)
    payload = b""
    while len(payload) < length:
        payload += conn.recv(length - len(payload))
    return code, payload


def _closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:  # closed with bytes of ours unread
        return True


def test_server_info_names_the_socket(served: tuple[Any, int], directory: Path,
                                      client: LossClient) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        info = channel.unary_unary(
            "/lossgrad.v1.LossService/GetServerInfo",
            request_serializer=pb.GetServerInfoRequest.SerializeToString,
            response_deserializer=pb.GetServerInfoResponse.FromString)(pb.GetServerInfoRequest())
    assert info.features.shared_memory_socket == f"lossgrad-{served[1]}.sock"
    assert _socket_path(served, directory).is_socket()
    assert _socket_path(served, directory).stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_calls_go_over_the_socket_with_the_same_bits(
        served: tuple[Any, int], client: LossClient, directory: Path, dtype: Any) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, 10)).astype(dtype)
    labels = rng.integers(0, 10, size=256)
    y = rng.normal(size=x.shape).astype(dtype)
    telemetry = served[0].telemetry
    before = telemetry.loss_counts().get("mse", (0, 0))[0]
    with LossClient(f"127.0.0.1:{served[1]}", timeout=TIMEOUT_S) as plain:
        xs, ys, out = _shared(client, x), _shared(client, y), client.shared_array(x.shape, dtype)
        got = client.compute_gradient("mse", xs, ys, out=out)
        want = plain.compute_gradient("mse", x, y)
        assert client._shm is not None and client._shm.link is not None
        assert got.gradient is out and out.tobytes() == want.gradient.tobytes()
        assert got.loss == want.loss
        # copying mode and REDUCTION_NONE losses come back through the staging segment
        losses = client.compute_loss("sparse_categorical_cross_entropy", x, labels,
                                     from_logits=True, reduction="none")
        assert losses.loss.tobytes() == plain.compute_loss(
            "sparse_categorical_cross_entropy", x, labels, from_logits=True,
            reduction="none").loss.tobytes()
        ce = client.compute_gradient("sparse_categorical_cross_entropy", xs, labels,
                                     from_logits=True, label_smoothing=0.1)
        ce_want = plain.compute_gradient("sparse_categorical_cross_entropy", x, labels,
                                         from_logits=True, label_smoothing=0.1)
        assert ce.loss == ce_want.loss
        assert ce.gradient.tobytes() == ce_want.gradient.tobytes()
    # the socket's calls are counted as the gRPC calls are
    assert telemetry.loss_counts()["mse"][0] == before + 2


def test_errors_carry_code_reason_and_field(client: LossClient) -> None:
    xs = _shared(client, np.ones(1000, np.float32))
    with pytest.raises(InvalidArgumentError) as caught:
        client.compute_gradient("huber", xs, xs, delta=-1.0)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "params.delta"
    assert caught.value.reason == "PARAMETER_OUT_OF_RANGE"
    assert "params.delta" in caught.value.message
    with pytest.raises(InvalidArgumentError) as caught:
        client.compute_gradient("mse", xs, _shared(client, np.ones(999, np.float32)))
    assert caught.value.field is not None and caught.value.field.startswith("targets")
    # the connection is still good for the next call
    assert client.compute_gradient("mse", xs, xs).loss == 0.0


def test_without_the_socket_calls_use_grpc(served: tuple[Any, int],
                                           directory: Path) -> None:
    with LossClient(f"127.0.0.1:{served[1]}", timeout=TIMEOUT_S, shared_memory=SharedMemoryOptions(
            directory=str(directory), socket=False)) as c:
        xs = _shared(c, np.arange(1000, dtype=np.float32))
        assert c.compute_gradient("mse", xs, xs * 0).loss == pytest.approx(332833.5)
        assert c._shm is not None and c._shm.link is None


def test_a_server_without_a_socket(tmp_path: Path) -> None:
    server, port = create_server(shared_memory=SharedMemoryConfig(str(tmp_path), socket=""))
    try:
        assert not [p for p in tmp_path.iterdir() if p.is_socket()]
        with LossClient(f"127.0.0.1:{port}", timeout=TIMEOUT_S,
                        shared_memory=SharedMemoryOptions(directory=str(tmp_path))) as c:
            xs = _shared(c, np.ones(100, np.float32))
            assert c.compute_gradient("mse", xs, xs).loss == 0.0
            assert c._shm is not None and c._shm.link_known and c._shm.link is None
    finally:
        server.stop(0).wait()


def test_a_socket_that_cannot_be_reached_falls_back_to_grpc(tmp_path: Path) -> None:
    server, port = create_server(shared_memory=SharedMemoryConfig(str(tmp_path)))
    try:
        (tmp_path / f"lossgrad-{port}.sock").unlink()  # e.g. another mount of the volume
        with LossClient(f"127.0.0.1:{port}", timeout=TIMEOUT_S,
                        shared_memory=SharedMemoryOptions(directory=str(tmp_path))) as c:
            xs = _shared(c, np.full(100, 2.0, np.float32))
            assert c.compute_gradient("mse", xs, xs * 0).loss == 4.0
            assert c.compute_loss("mae", xs, xs * 0).loss == 2.0
    finally:
        server.stop(0).wait()
    assert list(tmp_path.iterdir()) == []


def test_token_is_required_on_the_socket_too(tmp_path: Path) -> None:
    server, port = create_server(shared_memory=SharedMemoryConfig(str(tmp_path)),
                                 auth_token="s3cret")
    path = tmp_path / f"lossgrad-{port}.sock"
    try:
        with LossClient(f"127.0.0.1:{port}", timeout=TIMEOUT_S, token="s3cret",
                        shared_memory=SharedMemoryOptions(directory=str(tmp_path))) as c:
            xs = _shared(c, np.ones(100, np.float32))
            assert c.compute_gradient("mse", xs, xs).loss == 0.0
            assert c._shm is not None and c._shm.link is not None
        for token in (b"", b"wrong"):
            with _connect(path, token) as conn:
                code, payload = _frame(conn)
                assert code == grpc.StatusCode.UNAUTHENTICATED.value[0]
                assert "token" in json.loads(payload)["message"]
                assert _closed(conn)
        with _connect(path, b"s3cret") as conn:
            assert _frame(conn) == (0, b"")
        with pytest.raises(UnauthenticatedError):
            SharedMemorySocketLink(str(path), "wrong").call(COMPUTE_GRADIENT, b"", TIMEOUT_S)
    finally:
        server.stop(0).wait()


def test_malformed_frames_get_errors_and_the_server_keeps_serving(
        served: tuple[Any, int], directory: Path, client: LossClient) -> None:
    path = _socket_path(served, directory)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with raw:
        raw.settimeout(TIMEOUT_S)
        raw.connect(str(path))
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        code, payload = _frame(raw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "shared-memory socket" in json.loads(payload)["message"]
        assert _closed(raw)
    with _connect(path) as conn:
        assert _frame(conn) == (0, b"")
        conn.sendall(REQUEST.pack(2, 5, 0.0) + b"\xff\xff\xff\xff\xff")  # not a message
        code, payload = _frame(conn)
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        conn.sendall(REQUEST.pack(9, 0, 0.0))
        code, payload = _frame(conn)
        assert code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        request = pb.ComputeGradientRequest(loss="mse", predictions=pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[1], data=b"\0\0\x80?"), targets=pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[1], data=b"\0\0\0\0")).SerializeToString()
        conn.sendall(REQUEST.pack(2, len(request), 1e-9) + request)  # a deadline long gone
        code, payload = _frame(conn)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        conn.sendall(REQUEST.pack(2, len(request), 0.0) + request)  # bytes work as well
        code, payload = _frame(conn)
        assert code == 0
        assert pb.ComputeGradientResponse.FromString(payload).loss == 1.0
        conn.sendall(REQUEST.pack(2, (1 << 20) + 1, 0.0))
        code, payload = _frame(conn)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "max_message_bytes" in json.loads(payload)["message"]
        assert _closed(conn)
    with _connect(path) as conn:  # a client that disconnects mid-frame
        assert _frame(conn) == (0, b"")
        conn.sendall(REQUEST.pack(2, 100, 0.0) + b"\0" * 10)
    xs = _shared(client, np.ones(10, np.float32))
    assert client.compute_gradient("mse", xs, xs * 0).loss == 1.0


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "lossgrad-x.sock"))
    stale.close()  # the file stays, nobody listens: a crashed server's
    config = SharedMemoryConfig(str(tmp_path), socket="lossgrad-x.sock")
    server, port = create_server(shared_memory=config)
    try:
        with pytest.raises(OSError, match="another server listens"):
            create_server(shared_memory=config)
        with LossClient(f"127.0.0.1:{port}", timeout=TIMEOUT_S,
                        shared_memory=SharedMemoryOptions(directory=str(tmp_path))) as c:
            xs = _shared(c, np.ones(10, np.float32))
            assert c.compute_gradient("mse", xs, xs).loss == 0.0
            assert c._shm is not None and c._shm.link is not None
    finally:
        server.stop(0).wait()
    (tmp_path / "lossgrad-x").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        create_server(shared_memory=SharedMemoryConfig(str(tmp_path), socket="lossgrad-x"))


def test_stopping_refuses_new_calls_and_removes_the_socket(tmp_path: Path) -> None:
    server, port = create_server(shared_memory=SharedMemoryConfig(str(tmp_path)))
    path = tmp_path / f"lossgrad-{port}.sock"
    conn = _connect(path)
    assert _frame(conn) == (0, b"")
    server.stop(5).wait()
    assert not path.exists()
    with conn:
        try:
            conn.sendall(REQUEST.pack(2, 0, 0.0))
            code, _ = _frame(conn)
            assert code == grpc.StatusCode.UNAVAILABLE.value[0]
        except (OSError, AssertionError):
            pass  # or the connection was already ended: no call is taken either way
    assert not os.path.exists(path)


@pytest.mark.parametrize("name", ["a/b", "..", "x y", "lossgrad-{pid}.sock"])
def test_bad_socket_names_are_usage_errors(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--shared-memory", "--shared-memory-socket", name])
    assert stopped.value.code == 2
    assert "--shared-memory-socket" in capsys.readouterr().err


def test_a_forked_child_opens_connections_of_its_own(client: LossClient,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    xs = _shared(client, np.full(100, 3.0, np.float32))
    zeros = _shared(client, np.zeros(100, np.float32))
    assert client.compute_loss("mse", xs, zeros).loss == 9.0  # leaves an idle connection
    link = client._shm.link if client._shm is not None else None
    assert link is not None and len(link._idle) == 1
    parents = list(link._idle)
    # what a forked child sees (a real fork would also copy gRPC's and numba's threads)
    monkeypatch.setattr(os, "getpid", lambda: link._pid + 1)
    assert client.compute_loss("mse", xs, zeros).loss == 9.0
    assert link._idle and not set(link._idle) & set(parents)  # a connection of its own
    assert all(conn.fileno() == -1 for conn in parents)  # its copies of the parent's closed
