"""Client side of the server's shared-memory socket: ComputeLoss and ComputeGradient
calls whose tensors are in shared memory, over a Unix socket in the shared-memory
directory instead of gRPC (a round trip of ~20 µs instead of ~0.45 ms). The framing is
described in the server's ``lossgrad/shm_socket.py``.

A connection carries one call at a time; idle connections are kept for the next call.
When the socket cannot be reached, or a connection breaks before its answer, the
caller sends the call over gRPC instead (:class:`SocketDown`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import grpc

from .errors import DeadlineExceededError, LossgradError, error_for_code

HELLO = struct.Struct("<4sBI")
REQUEST = struct.Struct("<B3xId")
RESPONSE = struct.Struct("<B3xI")
MAGIC, VERSION = b"LGSM", 1
COMPUTE_LOSS, COMPUTE_GRADIENT = 1, 2
_RETRY_AFTER_S = 5.0  # after a failed connect, gRPC only for this long
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SocketDown(Exception):
    """The socket could not carry the call; it was not computed (send it over gRPC)."""


class SharedMemorySocketLink:
    """Calls over the server's shared-memory socket at ``path``; thread-safe."""

    def __init__(self, path: str, token: str | None) -> None:
        self.path = path
        self._hello = HELLO.pack(MAGIC, VERSION, 0)
        if token is not None:
            raw = token.encode()
            self._hello = HELLO.pack(MAGIC, VERSION, len(raw)) + raw
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._down_until = 0.0
        self._closed = False
        self._pid = os.getpid()

    def call(self, method: int, request: bytes, timeout: float | None) -> bytes:
        """The serialized response; a LossgradError for an error status; SocketDown
        when the call should go over gRPC."""
        conn = self._take(timeout)
        try:
            conn.settimeout(timeout)
            conn.sendall(REQUEST.pack(method, len(request), timeout or 0.0) + request)
            code, payload = _receive(conn)
        except TimeoutError:
            conn.close()
            raise DeadlineExceededError("Deadline Exceeded",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except (OSError, SocketDown) as err:  # the server went away: not computed here
            conn.close()
            raise SocketDown(str(err)) from err
        if code is grpc.StatusCode.UNAVAILABLE:  # shutting down; gRPC says it properly
            conn.close()
            raise SocketDown(payload.decode("utf-8", "replace"))
        self._give_back(conn)
        if code is not grpc.StatusCode.OK:
            raise _error(code, payload)
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self, timeout: float | None) -> socket.socket:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the connections are its parent's
                for conn in self._idle:
                    conn.close()  # the child's copy only (no shutdown): the parent's stays
                self._pid, self._idle = os.getpid(), []
            if self._idle:
                return self._idle.pop()
            if self._closed or time.monotonic() < self._down_until:
                raise SocketDown("the shared-memory socket is not in use")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            conn.connect(self.path)
            conn.sendall(self._hello)
            code, payload = _receive(conn)
        except (OSError, SocketDown) as err:
            conn.close()
            with self._lock:
                self._down_until = time.monotonic() + _RETRY_AFTER_S
            raise SocketDown(f"cannot use {self.path}: {err}") from err
        if code is not grpc.StatusCode.OK:
            conn.close()
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise _error(code, payload)
            raise SocketDown(payload.decode("utf-8", "replace"))  # e.g. too many connections
        return conn

    def _give_back(self, conn: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()


def _receive(conn: socket.socket) -> tuple[grpc.StatusCode, bytes]:
    header = _read(conn, RESPONSE.size)
    number, length = RESPONSE.unpack(header)
    code = _CODES.get(number)
    if code is None:
        raise SocketDown(f"unknown status code {number}")
    return code, _read(conn, length)


def _read(conn: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = conn.recv(size - got)
        if not data:
            raise SocketDown("the server closed the connection")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _error(code: grpc.StatusCode, payload: bytes) -> LossgradError:
    try:
        found = json.loads(payload)
        message, reason, field = found["message"], found["reason"], found["field"]
    except (ValueError, KeyError, TypeError):
        message, reason, field = payload.decode("utf-8", "replace"), "", ""
    return error_for_code(code, str(message), reason=str(reason) or None,
                          field=str(field) or None)
