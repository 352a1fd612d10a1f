"""Domain errors to gRPC status: one table, and the abort that uses it.

An error the engine raised on purpose goes to the caller as its status code, with
``str(err)`` ("field: message") as details, and in trailing metadata:

- ``grpc-status-details-bin``: a ``google.rpc.Status`` (code, message) whose details hold an
  ``ErrorInfo`` (domain ``lossgrad``, the stable reason, the field in its metadata) and, for
  INVALID_ARGUMENT, a ``BadRequest`` with one field violation (the field path, e.g.
  ``targets.shape[0]``, and the message);
- ``lossgrad-error-reason`` and ``lossgrad-error-field``: the same reason and field as plain
  ASCII, for clients without the google.rpc protos.

Anything else is INTERNAL with a generic message and a Status without details; the
traceback stays in the server log.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LossgradError,
    NotFoundError,
    ResourceExhaustedError,
)

REASON_KEY = "lossgrad-error-reason"
FIELD_KEY = "lossgrad-error-field"
ERROR_DOMAIN = "lossgrad"

STATUS_CODES: dict[type[LossgradError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
}

INTERNAL_MESSAGE = "internal error; see the server log"

_log = logging.getLogger("lossgrad.service")


def status_code(err: BaseException) -> grpc.StatusCode | None:
    """Return the status code for a domain error, or None for anything else."""
    for cls, code in STATUS_CODES.items():
        if isinstance(err, cls):
            return code
    return None


def abort(context: grpc.ServicerContext, err: BaseException, method: str) -> NoReturn:
    """End the RPC with the status that ``err`` maps to; never returns."""
    code = status_code(err)
    if code is None or not isinstance(err, LossgradError):  # a bug, not the caller's fault
        _log.exception("%s failed", method, exc_info=err)
        status = rpc_status.to_status(status_pb2.Status(
            code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_MESSAGE))
        context.set_trailing_metadata((*_kept(context), *status.trailing_metadata))
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        raise AssertionError("unreachable")  # context.abort raises
    status = rich_status(code, str(err), err.reason, err.field, err.message)
    context.set_trailing_metadata((
        *_kept(context), *status.trailing_metadata,
        (REASON_KEY, _ascii(err.reason)), (FIELD_KEY, _ascii(err.field))))
    context.abort(code, str(err))
    raise AssertionError("unreachable")


def _kept(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata already set for the call (the request id), kept on errors."""
    return tuple(context.trailing_metadata() or ())


def rich_status(code: grpc.StatusCode, message: str, reason: str, field: str,
                description: str = "") -> grpc.Status:
    """A grpc.Status whose trailing metadata carries the google.rpc.Status of an error."""
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=reason, domain=ERROR_DOMAIN, metadata={"field": field} if field else {}))]
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=description or message)])))
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details))


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _ascii(value: str) -> str:
    # Metadata values must be printable ASCII; reasons and fields always are, but be safe.
    return value.encode("unicode_escape").decode("ascii")
