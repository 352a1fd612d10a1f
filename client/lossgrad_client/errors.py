"""Exceptions of the lossgrad client.

Every error a call raises is a :class:`LossgradError`. Errors from the server keep the
original :class:`grpc.RpcError` as ``__cause__``; errors the client detects before
sending (an unknown parameter, an unsupported dtype) have no cause and use the same
classes and reasons as the server would.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

REASON_KEY = "lossgrad-error-reason"
FIELD_KEY = "lossgrad-error-field"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LossgradError(Exception):
    """Base of every client error.

    ``code`` is the gRPC status code, ``message`` the server's details (``"field:
    message"``), ``reason`` the stable machine-readable reason (``"UNKNOWN_LOSS"``) and
    ``field`` the request path of the offending value (``"params.delta"``); ``reason``
    and ``field`` are None when the server did not send them.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        return f"{name}: {self.message}"


class InvalidArgumentError(LossgradError, ValueError):
    """The request is malformed or a value is outside the loss's domain."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(LossgradError):
    """The request exceeds a limit of the server or the channel (e.g. message size)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(LossgradError, TimeoutError):
    """The call did not finish before its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(LossgradError, ConnectionError):
    """The server cannot be reached (not running, wrong address, shutting down)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(LossgradError, PermissionError):
    """The server wants a bearer token (``token=``) and got none or a wrong one."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LossgradError, PermissionError):
    """The caller is known but not allowed to make the call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class NotFoundError(LossgradError, LookupError):
    """The server has no such thing (e.g. a shared-memory region it was not given, or
    lost when it restarted)."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LossgradError):
    """The name is taken (a shared-memory region registered differently)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(LossgradError):
    """The server cannot do this in its configuration (e.g. shared memory is off)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(LossgradError):
    """The server failed; its log has the details."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LossgradError]] = {
    cls.default_code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, DeadlineExceededError,
                UnavailableError, UnauthenticatedError, PermissionDeniedError, InternalError,
                NotFoundError, AlreadyExistsError, FailedPreconditionError)
}


def from_rpc_error(err: grpc.RpcError) -> LossgradError:
    """Return the LossgradError for a failed call; the caller raises it ``from err``.

    ``reason`` and ``field`` come from the ``google.rpc.Status`` in the
    ``grpc-status-details-bin`` trailer (its ErrorInfo and first BadRequest field
    violation) when the googleapis-common-protos package is importable, and otherwise,
    or where the Status lacks them, from the ``lossgrad-error-reason`` and
    ``lossgrad-error-field`` trailers.
    """
    code = _call_attr(err, "code")
    details = _call_attr(err, "details")
    metadata = _call_attr(err, "trailing_metadata")
    values: dict[str, str] = {}
    status_details: bytes | None = None
    # A tuple of (key, value) pairs; grpc.aio.Metadata from an asyncio call.
    for key, value in metadata if isinstance(metadata, Iterable) else ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status_details = value
            continue
        if isinstance(value, bytes):  # "-bin" keys carry bytes
            value = value.decode("utf-8", "replace")
        values[str(key)] = str(value)
    status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    message = details if isinstance(details, str) and details else str(err)
    reason, field = _rich_status(status_details)
    return error_for_code(status, message, reason=reason or values.get(REASON_KEY),
                          field=field or values.get(FIELD_KEY))


def error_for_code(code: grpc.StatusCode, message: str, *, reason: str | None = None,
                   field: str | None = None) -> LossgradError:
    """The LossgradError subclass for ``code``, with these attributes."""
    return _BY_CODE.get(code, LossgradError)(message, code=code, reason=reason, field=field)


def _rich_status(data: bytes | None) -> tuple[str | None, str | None]:
    """(reason, field) of a serialized google.rpc.Status, or Nones where it has none or
    googleapis-common-protos is not installed."""
    if data is None:
        return None, None
    try:  # optional: googleapis-common-protos comes with grpcio-status, not with this client
        import google.rpc.error_details_pb2 as error_details_pb2
        import google.rpc.status_pb2 as status_pb2
    except ImportError:
        return None, None
    try:
        status = status_pb2.Status.FromString(data)
    except Exception:  # DecodeError; a malformed trailer must not hide the real error
        return None, None
    reason: str | None = None
    field: str | None = None
    for detail in status.details:
        if reason is None and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = str(info.reason) or None
        elif field is None and detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            if bad_request.field_violations:
                field = str(bad_request.field_violations[0].field) or None
    return reason, field


def _call_attr(err: grpc.RpcError, name: str) -> object:
    # A failed unary call's RpcError is also a grpc.Call; other RpcErrors may not be.
    method = getattr(err, name, None)
    return method() if callable(method) else None
