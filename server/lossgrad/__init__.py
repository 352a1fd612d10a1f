"""lossgrad: loss values and their gradients, in-process or as a gRPC service."""

from .catalog import LOSSES
from .engine import Reduction, Result, compute, warmup
from .errors import InvalidArgumentError, LossgradError, ResourceExhaustedError

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "InvalidArgumentError",
    "LossgradError",
    "Reduction",
    "ResourceExhaustedError",
    "Result",
    "compute",
    "warmup",
]
