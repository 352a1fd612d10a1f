"""Domain errors of the engine. The gRPC layer maps them to status codes in one table."""

from __future__ import annotations


class LossgradError(Exception):
    """Base of every error the engine raises on purpose.

    ``field`` is the request path of the offending value (``targets.shape[0]``,
    ``params.delta``); ``reason`` is a stable machine-readable code.
    """

    reason = "LOSSGRAD_ERROR"

    def __init__(self, field: str, message: str, reason: str | None = None) -> None:
        self.field = field
        self.message = message
        if reason is not None:
            self.reason = reason
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgumentError(LossgradError, ValueError):
    """The request is malformed or its values are outside the loss's domain."""

    reason = "INVALID_ARGUMENT"


class ResourceExhaustedError(LossgradError):
    """The request exceeds a configured limit."""

    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(LossgradError):
    """The call's deadline passed before the work started."""

    reason = "DEADLINE_EXCEEDED"


class NotFoundError(LossgradError):
    """The request names something the server does not have (a model of the Open
    Inference Protocol API, a shared-memory region)."""

    reason = "NOT_FOUND"


class AlreadyExistsError(LossgradError):
    """The request would replace something that exists (a region of the same name)."""

    reason = "ALREADY_EXISTS"


class FailedPreconditionError(LossgradError):
    """The server is not in a state to do this (shared memory is off, a region shrank)."""

    reason = "FAILED_PRECONDITION"


# Stable reasons carried by ResourceExhaustedError.
TOO_MANY_ELEMENTS = "TOO_MANY_ELEMENTS"
TOO_MANY_CONCURRENT_CALLS = "TOO_MANY_CONCURRENT_CALLS"

# Stable reasons carried by InvalidArgumentError.
UNKNOWN_LOSS = "UNKNOWN_LOSS"
UNKNOWN_PARAMETER = "UNKNOWN_PARAMETER"
DUPLICATE_PARAMETER = "DUPLICATE_PARAMETER"
PARAMETER_OUT_OF_RANGE = "PARAMETER_OUT_OF_RANGE"
MISSING_FIELD = "MISSING_FIELD"
UNEXPECTED_FIELD = "UNEXPECTED_FIELD"
UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
NEGATIVE_DIMENSION = "NEGATIVE_DIMENSION"
BYTE_SIZE_MISMATCH = "BYTE_SIZE_MISMATCH"
SHAPE_MISMATCH = "SHAPE_MISMATCH"
EMPTY_BATCH = "EMPTY_BATCH"
LABEL_OUT_OF_RANGE = "LABEL_OUT_OF_RANGE"
INVALID_LABELS = "INVALID_LABELS"
VALUE_OUT_OF_RANGE = "VALUE_OUT_OF_RANGE"
NONFINITE_INPUT = "NONFINITE_INPUT"
UNKNOWN_REDUCTION = "UNKNOWN_REDUCTION"
MALFORMED_REQUEST = "MALFORMED_REQUEST"
# Open Inference Protocol (KServe v2) API: NotFoundError for a model, InvalidArgumentError
# for an input or output name the model does not have.
UNKNOWN_MODEL = "UNKNOWN_MODEL"
UNKNOWN_TENSOR = "UNKNOWN_TENSOR"
MALFORMED_STREAM = "MALFORMED_STREAM"
TOO_MANY_CHUNKS = "TOO_MANY_CHUNKS"
NOT_STREAMABLE = "NOT_STREAMABLE"
UNKNOWN_HESSIAN_MODE = "UNKNOWN_HESSIAN_MODE"
HESSIAN_NOT_SUPPORTED = "HESSIAN_NOT_SUPPORTED"

# Stable reasons of the shared-memory transport (any of the classes above).
SHARED_MEMORY_DISABLED = "SHARED_MEMORY_DISABLED"
SHARED_MEMORY_INVALID_NAME = "SHARED_MEMORY_INVALID_NAME"
SHARED_MEMORY_INVALID_KEY = "SHARED_MEMORY_INVALID_KEY"
SHARED_MEMORY_KEY_NOT_FOUND = "SHARED_MEMORY_KEY_NOT_FOUND"
SHARED_MEMORY_REGION_NOT_FOUND = "SHARED_MEMORY_REGION_NOT_FOUND"
SHARED_MEMORY_REGION_EXISTS = "SHARED_MEMORY_REGION_EXISTS"
SHARED_MEMORY_OUT_OF_RANGE = "SHARED_MEMORY_OUT_OF_RANGE"
SHARED_MEMORY_MISALIGNED = "SHARED_MEMORY_MISALIGNED"
SHARED_MEMORY_OVERLAP = "SHARED_MEMORY_OVERLAP"
SHARED_MEMORY_READ_ONLY = "SHARED_MEMORY_READ_ONLY"
SHARED_MEMORY_CHANGED = "SHARED_MEMORY_CHANGED"
DATA_AND_SHARED_MEMORY = "DATA_AND_SHARED_MEMORY"
TOO_MANY_SHARED_MEMORY_REGIONS = "TOO_MANY_SHARED_MEMORY_REGIONS"
TOO_MANY_SHARED_MEMORY_BYTES = "TOO_MANY_SHARED_MEMORY_BYTES"
