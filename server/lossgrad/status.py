"""Domain errors to gRPC status: one table, and the abort that uses it.

An error the engine raised on purpose goes to the caller as its status code, with
``str(err)`` ("field: message") as details and the stable reason and field in trailing
metadata. Anything else is INTERNAL with a generic message; the traceback stays in the
server log.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from .errors import InvalidArgumentError, LossgradError, ResourceExhaustedError

REASON_KEY = "lossgrad-error-reason"
FIELD_KEY = "lossgrad-error-field"

STATUS_CODES: dict[type[LossgradError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        raise AssertionError("unreachable")  # context.abort raises
    context.set_trailing_metadata(
        ((REASON_KEY, _ascii(err.reason)), (FIELD_KEY, _ascii(err.field))))
    context.abort(code, str(err))
    raise AssertionError("unreachable")


def _ascii(value: str) -> str:
    # Metadata values must be printable ASCII; reasons and fields always are, but be safe.
    return value.encode("unicode_escape").decode("ascii")
