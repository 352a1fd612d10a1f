"""Typed Python client of the lossgrad service (needs only grpcio, protobuf and NumPy).

>>> from lossgrad_client import LossClient
>>> with LossClient("127.0.0.1:50051") as client:  # doctest: +SKIP
...     result = client.compute_gradient("huber", predictions, targets, delta=0.5)
"""

from ._aio import AsyncLossClient
from ._allocator import tune_allocator
from ._client import LossClient
from ._shm import SharedMemoryOptions
from ._types import (
    GradientResult,
    InputInfo,
    LossInfo,
    LossResult,
    ParamInfo,
    PluginInfo,
)
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LossgradError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AsyncLossClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GradientResult",
    "InputInfo",
    "InternalError",
    "InvalidArgumentError",
    "LossClient",
    "LossInfo",
    "LossResult",
    "LossgradError",
    "NotFoundError",
    "ParamInfo",
    "PermissionDeniedError",
    "PluginInfo",
    "ResourceExhaustedError",
    "SharedMemoryOptions",
    "UnauthenticatedError",
    "UnavailableError",
    "tune_allocator",
]
