"""The in-process engine: look up the loss, validate, call the kernel, reduce.

``compute`` is the one code path; the gRPC servicer only converts messages and calls it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class Reduction(enum.Enum):
    NONE = "none"
    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class Result:
    """What ``compute`` returns.

    ``loss`` is a float for SUM/MEAN and a per-position array (predictions' dtype) for
    NONE. ``gradient`` has the predictions' shape and dtype, or is None when not asked for.
    """

    loss: float | np.ndarray
    gradient: np.ndarray | None
    positions: int
    positions_counted: int
    weight_sum: float


def compute(
    loss: str,
    predictions: Any,
    targets: Any,
    *,
    reduction: Reduction | str = Reduction.MEAN,
    sample_weight: Any = None,
    gradient: bool = True,
    allow_nonfinite: bool = False,
    **params: Any,
) -> Result:
    raise NotImplementedError


def warmup() -> None:
    raise NotImplementedError
