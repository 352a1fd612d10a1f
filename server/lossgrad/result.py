"""What ``lossgrad.compute`` returns, and the one-step way the runners build it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    """What ``compute`` returns.

    ``loss`` is a float for SUM/MEAN and a per-position array of w_i * l_i
    (predictions' dtype) for NONE. ``gradient`` has the predictions' shape and dtype,
    or is None when not asked for. ``weight_sum`` is the divisor of MEAN and
    ``positions_counted`` the number of positions with a non-zero weight. ``total`` is
    the unreduced sum of w * loss (from ``Batch.start`` on; rmse: of w * r^2). ``hessian``
    is the diagonal Hessian (the gradient's shape, dtype, weights and scale), or None
    when not asked for. ``variance_gradient`` (gaussian_nll, with the gradient) is the
    gradient w.r.t. the variance, in the variance's shape.
    """

    loss: float | np.ndarray
    gradient: np.ndarray | None
    positions: int
    positions_counted: int
    weight_sum: float
    total: float = 0.0
    hessian: np.ndarray | None = None
    variance_gradient: np.ndarray | None = None


_new_object = object.__new__


def new_result(loss: float | np.ndarray, gradient: np.ndarray | None, positions: int,
               positions_counted: int, weight_sum: float, total: float = 0.0,
               hessian: np.ndarray | None = None,
               variance_gradient: np.ndarray | None = None) -> Result:
    """``Result(...)`` in one step: a frozen dataclass's ``__init__`` sets its eight fields
    one by one, which is a tenth of a small call's time. Equal to the constructor's."""
    result = _new_object(Result)
    result.__dict__.update(loss=loss, gradient=gradient, positions=positions,
                           positions_counted=positions_counted, weight_sum=weight_sum,
                           total=total, hessian=hessian, variance_gradient=variance_gradient)
    return result
