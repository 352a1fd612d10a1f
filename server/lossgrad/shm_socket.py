"""The shared-memory socket: ComputeLoss and ComputeGradient over a Unix socket, for a
client on the server's host whose tensors are in shared memory.

A call whose tensors lie in registered regions carries only names, offsets and shapes,
and over Python gRPC the round trip alone (~0.45 ms here) costs more than PyTorch's
whole forward and backward at 1e6 elements. This socket carries the same serialized
messages with a fixed header instead, through the same handlers (validation, limits,
metrics, access log, error reasons); a round trip costs ~20 µs. Registering regions,
and every other method, stays on gRPC.

The socket is a file in the shared-memory directory (both containers of a pod mount
it), named in ``GetServerInfo`` (``ServerFeatures.shared_memory_socket``). Protocol,
integers little-endian:

- the client opens with ``b"LGSM"``, version byte 1, a u32 length and that many bytes
  of bearer token (0 without one); the server answers with a response frame, OK and
  empty or the error that closes the connection (UNAUTHENTICATED, RESOURCE_EXHAUSTED);
- request frame: u8 method (1 ComputeLoss, 2 ComputeGradient), 3 zero bytes, u32
  payload length, f64 timeout in seconds (0 for none), then the serialized
  ComputeLossRequest or ComputeGradientRequest;
- response frame: u8 status code (gRPC's numbering), 3 zero bytes, u32 payload length,
  then the serialized response when the code is OK, else UTF-8 JSON with ``message``,
  ``reason`` and ``field``.

Each connection carries one call at a time, on a thread of its own.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .status import FIELD_KEY, REASON_KEY

MAGIC = b"LGSM"
VERSION = 1
HELLO = struct.Struct("<4sBI")
REQUEST = struct.Struct("<B3xId")
RESPONSE = struct.Struct("<B3xI")
METHODS = {1: "ComputeLoss", 2: "ComputeGradient"}
DEFAULT_MAX_CONNECTIONS = 64
_MAX_TOKEN_BYTES = 4096

_log = logging.getLogger("lossgrad.shm_socket")

Handler = Callable[[Any, grpc.ServicerContext], Any]


class _Aborted(Exception):
    """Raised by :meth:`SocketContext.abort`, as grpc's own abort raises."""


class SocketContext:
    """The part of ``grpc.ServicerContext`` the Compute handlers use, for one socket call."""

    __slots__ = ("_deadline", "_code", "_details", "_trailing")

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout if timeout > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise _Aborted()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def error(self) -> bytes:
        """The JSON payload of the error this call was aborted with."""
        found = dict(self._trailing)
        return json.dumps({"message": self._details, "reason": found.get(REASON_KEY, ""),
                           "field": found.get(FIELD_KEY, "")}).encode()


def error_frame(code: grpc.StatusCode, message: str, reason: str = "") -> bytes:
    payload = json.dumps({"message": message, "reason": reason, "field": ""}).encode()
    return RESPONSE.pack(code.value[0], len(payload)) + payload


class SharedMemorySocket:
    """Listens on ``path`` and serves ``handlers`` (grpc unary method handlers of
    ComputeLoss and ComputeGradient, as registered on the gRPC server)."""

    def __init__(self, path: str, handlers: dict[str, grpc.RpcMethodHandler], *,
                 max_message_bytes: int, auth_token: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.path = path
        self._handlers = {number: handlers[name] for number, name in METHODS.items()}
        self._max_message_bytes = max_message_bytes
        self._token = None if auth_token is None else auth_token.encode()
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._listener = _listen(path)
        self._thread = threading.Thread(target=self._accept, name="lossgrad-shm-socket",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new connections and new calls; calls in progress finish."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def close(self) -> None:
        """Stop, and end every connection (after the grace period)."""
        self.stop()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full and not self._stopping:
                    self._connections.add(conn)
            if full:
                with contextlib.suppress(OSError):
                    conn.sendall(error_frame(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the shared-memory socket is at its limit of "
                        f"{self._max_connections} connections", "TOO_MANY_CONNECTIONS"))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="lossgrad-shm-socket-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._hello(conn):
                return
            while True:
                header = _read(conn, REQUEST.size)
                if header is None:
                    return  # the client closed the connection
                method, length, timeout = REQUEST.unpack(header)
                if length > self._max_message_bytes:
                    conn.sendall(error_frame(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the request is {length} bytes; the limit is "
                        f"{self._max_message_bytes} (max_message_bytes)"))
                    return
                payload = _read(conn, length)
                if payload is None:
                    return
                conn.sendall(self._call(method, payload, timeout))
        except OSError:
            pass  # the client went away, or close() ended the connection
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _hello(self, conn: socket.socket) -> bool:
        hello = _read(conn, HELLO.size)
        if hello is None:
            return False
        magic, version, length = HELLO.unpack(hello)
        if magic != MAGIC or version != VERSION or length > _MAX_TOKEN_BYTES:
            conn.sendall(error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"not a lossgrad shared-memory socket client, or "
                                     f"version {version} (this server speaks {VERSION})"))
            return False
        token = _read(conn, length) if length else b""
        if token is None:
            return False
        if self._token is not None and not hmac.compare_digest(token, self._token):
            conn.sendall(error_frame(grpc.StatusCode.UNAUTHENTICATED,
                                     "missing or invalid bearer token"))
            return False
        conn.sendall(RESPONSE.pack(0, 0))
        return True

    def _call(self, method: int, payload: bytes, timeout: float) -> bytes:
        handler = self._handlers.get(method)
        if handler is None:
            return error_frame(grpc.StatusCode.UNIMPLEMENTED, f"no method number {method}")
        if self._stopping:
            return error_frame(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        context = SocketContext(timeout)
        try:
            response = handler.unary_unary(handler.request_deserializer(payload), context)
            data = handler.response_serializer(response)
        except _Aborted:
            code = context.code()
            assert code is not None
            error = context.error()
            return RESPONSE.pack(code.value[0], len(error)) + error
        except Exception:  # a bug: the handlers map every error of theirs to a status
            _log.exception("%s over the shared-memory socket failed", METHODS[method])
            return error_frame(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        return RESPONSE.pack(0, len(data)) + data


def _read(conn: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None at end of stream."""
    data = conn.recv(size) if size else b""
    if len(data) == size:
        return data  # the usual case: a frame of locations is a few hundred bytes
    if not data:
        return None
    parts, got = [data], len(data)
    while got < size:
        data = conn.recv(min(size - got, 1 << 20))
        if not data:
            return None
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket file (its server gone) is
    replaced, a live one is an error."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as err:
            if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its server is gone
        else:
            raise OSError(errno.EADDRINUSE, f"another server listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o660)  # the worker's user, or its group (as for its segments)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener
