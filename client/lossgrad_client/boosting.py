"""Custom objectives for XGBoost and LightGBM whose gradient and Hessian come from a
lossgrad server.

>>> from lossgrad_client import LossClient
>>> from lossgrad_client.boosting import objective
>>> client = LossClient("127.0.0.1:50051")  # doctest: +SKIP
>>> obj = objective(client, "binary_cross_entropy", from_logits=True)  # doctest: +SKIP
>>> booster = xgboost.train(params, dtrain, 50, obj=obj)  # doctest: +SKIP
>>> booster = lightgbm.train({**params, "objective": obj}, train_set)  # doctest: +SKIP
>>> model = xgboost.XGBClassifier(objective=obj.sklearn)  # doctest: +SKIP

Each boosting round makes one ComputeGradient call with reduction "sum", so that the
server returns per-sample values: gradient w_i g_i and Hessian w_i h_i, the sample
weights of the training set applied as the libraries' built-in objectives apply theirs.
The predictions a custom objective receives are raw margins (before any sigmoid or
softmax), so a classification loss is used on logits (``from_logits=True``). Neither
library is imported here: the objective reads labels and weights through the
``get_label()`` and ``get_weight()`` that both data sets have.

Layouts (XGBoost >= 2, LightGBM >= 4): predictions of shape (n,) for one output and
(n, K) for K classes or targets, row-major; the gradient and Hessian come back in the
predictions' shape. Labels are class indices for ``class_indices`` losses, one-hot rows
for the other class losses, and reshaped to the predictions for elementwise losses.

Matching the built-in objectives (the server's ``hessian`` modes are in ``LossInfo``):

- ``reg:squarederror`` / LightGBM ``regression`` (r^2 / 2): ``"mse"`` with ``scale=0.5``;
- ``reg:pseudohubererror``: ``"pseudo_huber"`` with ``delta=huber_slope``;
- ``binary:logistic`` / LightGBM ``binary``: ``"binary_cross_entropy"`` with
  ``from_logits=True`` (the default ``hessian="clipped"`` floors s (1 - s) at 1e-16, as
  XGBoost does; LightGBM has no floor);
- ``multi:softprob``: ``"sparse_categorical_cross_entropy"`` with ``from_logits=True`` and
  ``hessian_scale=2.0`` (XGBoost's diagonal bound 2 p (1 - p)); LightGBM ``multiclass``
  uses ``hessian_scale=K / (K - 1)``;
- ``reg:absoluteerror``-like L1: ``"mae"`` with ``hessian="constant"`` (h = 1, without
  the built-in objective's leaf refit).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._types import LossInfo
from .errors import InvalidArgumentError

__all__ = ["RemoteObjective", "objective"]


class _Client(Protocol):
    def compute_gradient(self, loss: str, predictions: Any, targets: Any, **kwargs: Any) -> Any:
        ...

    def list_losses(self, *, timeout: float | None = None) -> list[LossInfo]:
        ...


class _Dataset(Protocol):
    def get_label(self) -> Any:
        ...

    def get_weight(self) -> Any:
        ...


def objective(client: _Client, loss: str, *, hessian: str = "clipped",
              hessian_floor: float | None = None, hessian_constant: float | None = None,
              scale: float = 1.0, hessian_scale: float = 1.0, timeout: float | None = None,
              **params: Any) -> RemoteObjective:
    """A custom objective computing ``loss`` (a name from ``list_losses``, with its
    ``params``) on the server that ``client`` (a LossClient) talks to.

    ``hessian`` is the server's Hessian mode: "clipped" (default: ``max(exact,
    hessian_floor)``, floor 1e-16, a positive Hessian as XGBoost's built-in objectives
    use), "exact", or "constant" (``hessian_constant``, default 1, for losses whose
    Hessian is 0 such as mae). ``scale`` multiplies the gradient and the Hessian (0.5
    turns r^2 into the r^2 / 2 of the libraries' squared error); ``hessian_scale``
    multiplies the Hessian alone (the libraries' softmax factors, see the module notes).
    ``timeout`` is each call's deadline in seconds.
    """
    return RemoteObjective(client, loss, hessian=hessian, hessian_floor=hessian_floor,
                           hessian_constant=hessian_constant, scale=scale,
                           hessian_scale=hessian_scale, timeout=timeout, params=params)


class RemoteObjective:
    """The objective :func:`objective` returns.

    Call it as ``obj(preds, dataset)`` (``xgboost.train(obj=...)``, LightGBM's
    ``params["objective"]``), use ``obj.sklearn`` for the scikit-learn interfaces
    (``XGBRegressor(objective=obj.sklearn)``, ``LGBMRegressor(objective=obj.sklearn)``), or
    ``obj.gradient_hessian(labels, preds, sample_weight)`` directly.
    """

    def __init__(self, client: _Client, loss: str, *, hessian: str,
                 hessian_floor: float | None, hessian_constant: float | None, scale: float,
                 hessian_scale: float, timeout: float | None, params: dict[str, Any]) -> None:
        self.client = client
        self.loss = loss
        self.params = params
        self._hessian = {"hessian": hessian, "hessian_floor": hessian_floor,
                         "hessian_constant": hessian_constant}
        self._scale = float(scale)
        self._hessian_scale = float(hessian_scale)
        self._timeout = timeout
        self._info: LossInfo | None = None
        self.calls = 0

    def __repr__(self) -> str:
        return f"RemoteObjective({self.loss!r}, {self._hessian['hessian']!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteObjective:
        """Itself: LightGBM deep-copies its parameters, and a client's channel cannot be
        copied (nor needs to be: the objective keeps no state between calls)."""
        return self

    def __call__(self, preds: Any, dataset: _Dataset) -> tuple[npt.NDArray[Any],
                                                                 npt.NDArray[Any]]:
        """The native-API objective: labels and weights from the training set."""
        return self.gradient_hessian(dataset.get_label(), preds, dataset.get_weight())

    def sklearn(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tuple[
            npt.NDArray[Any], npt.NDArray[Any]]:
        """The scikit-learn-API objective: XGBoost passes ``sample_weight`` by name when
        the function has that parameter, LightGBM passes it third when the function takes
        three arguments; this one has both."""
        return self.gradient_hessian(y_true, y_pred, sample_weight)

    def gradient_hessian(self, labels: Any, preds: Any, sample_weight: Any = None) -> tuple[
            npt.NDArray[Any], npt.NDArray[Any]]:
        """Per-sample gradient and diagonal Hessian of the loss at ``preds`` (float64,
        the predictions' shape), from one ComputeGradient call."""
        x = np.asarray(preds, dtype=np.float64)
        weight = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        if weight is not None and weight.size == 0:
            weight = None  # XGBoost's get_weight() of a data set without weights
        result = self.client.compute_gradient(
            self.loss, x, self._targets(np.asarray(labels), x), reduction="sum",
            sample_weight=weight, timeout=self._timeout, **self._hessian, **self.params)
        self.calls += 1
        grad = np.asarray(result.gradient, dtype=np.float64)
        hess = np.asarray(result.hessian, dtype=np.float64)
        if self._scale != 1.0:
            grad = grad * self._scale
            hess = hess * self._scale
        if self._hessian_scale != 1.0:
            hess = hess * self._hessian_scale
        return grad, hess

    def _targets(self, labels: npt.NDArray[Any], x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The labels in the layout the loss takes (see the module notes)."""
        info = self._loss_info()
        if info.targets.kind == "class_indices":
            return labels.reshape(x.shape[:-1]).astype(np.int64)
        if info.class_axis_last and labels.size == x.size // x.shape[-1]:
            onehot = np.zeros(x.shape, dtype=np.float64)
            index = labels.reshape(x.shape[:-1] + (1,)).astype(np.int64)
            np.put_along_axis(onehot, index, 1.0, axis=-1)
            return onehot
        return labels.astype(np.float64).reshape(x.shape)

    def _loss_info(self) -> LossInfo:
        if self._info is None:
            infos = self.client.list_losses(timeout=self._timeout)
            found = next((i for i in infos if self.loss in (i.name, *i.aliases)), None)
            if found is None:
                known = ", ".join(sorted(i.name for i in infos))
                raise InvalidArgumentError(
                    f"loss: unknown loss {self.loss!r}; known losses: {known}",
                    reason="UNKNOWN_LOSS", field="loss")
            self._info = found
        return self._info
