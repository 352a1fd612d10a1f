"""``lossgrad plot``: a loss and its gradient as functions of the prediction, drawn from
what a server computes (matplotlib, the optional ``plot`` extra).

Each loss is called once per target on a grid of predictions, with REDUCTION_NONE: the
per-position values are the loss curve and the gradient (of their sum) is
d loss / d prediction at each point. The grid follows the loss's prediction kind: a
range around the targets for values, [-4, 4] for logits and scores, (0, 1) for
probabilities. Class losses get two-class rows whose first entry varies (the other logit
0, or the other probability 1 - p); target 0 makes that entry the true class, target 1
the wrong one. Losses whose grids differ go into separate columns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lossgrad_client import InvalidArgumentError, LossClient, LossInfo, ParamInfo

POINTS = 401
_DEFAULT_TARGETS = {  # one loss / several losses on one figure
    "values": ((0.0, 1.0, 3.0), (0.0,)),
    "binary": ((1.0, 0.0), (1.0,)),
    "class": ((0.0, 1.0), (0.0,)),
}
_XLABELS = {
    "values": "prediction",
    "logits": "score / logit",
    "probabilities": "predicted probability",
    "log_probabilities": "predicted log-probability",
}
_STYLES = ("-", "--", ":", "-.")


class PlotError(ValueError):
    """A request the plot cannot be made from (unknown loss, bad parameter, no matplotlib)."""


@dataclass
class Curve:
    """One loss (with its parameters) at one target: x, loss and gradient."""

    label: str
    target: float
    x: np.ndarray
    loss: np.ndarray
    gradient: np.ndarray


@dataclass
class Panel:
    """A column of the figure: losses that share a grid (kind and shape of inputs)."""

    kind: str
    structure: str
    curves: list[Curve] = field(default_factory=list)


@dataclass(frozen=True)
class LossRequest:
    """A loss to draw: the name (or alias) given and its parameters."""

    name: str
    params: dict[str, Any]


def resolve(infos: Sequence[LossInfo], specs: Sequence[str],
            shared_params: Sequence[str]) -> list[tuple[LossInfo, LossRequest]]:
    """Match each LOSS[:k=v,...] to the catalog and type its parameters. A shared
    ``--param k=v`` applies to every loss that has ``k`` and must fit at least one. An
    alias brings the values it fixes (``sigmoid_cross_entropy``: from_logits=true), which
    a shared parameter leaves alone and the alias's own may not change."""
    by_name = {name: info for info in infos for name in (info.name, *info.aliases)}
    resolved = []
    used: set[str] = set()
    for spec in specs:
        name, _, rest = spec.partition(":")
        info = by_name.get(name)
        if info is None:
            raise PlotError(f"unknown loss {name!r}; the server has: "
                            + ", ".join(sorted(by_name)))
        preset = dict(info.alias_params.get(name, {}))
        params: dict[str, Any] = {}
        for item, shared in [(s, True) for s in shared_params] + [
                (s, False) for s in rest.split(",") if s]:
            key, value = _split(item)
            param = info.param(key)
            if param is None:
                if shared:
                    continue
                raise PlotError(f"{name} has no parameter {key!r} (its parameters: "
                                + (", ".join(p.name for p in info.params) or "none") + ")")
            typed = _value(param, value, name)
            used.add(key)
            if key in preset and typed != preset[key]:
                if shared:
                    continue
                raise PlotError(f"{name} means {key}={preset[key]}; use {info.name} for "
                                f"{key}={value}")
            params[key] = typed
        resolved.append((info, LossRequest(name, {**preset, **params})))
    for item in shared_params:
        key, _ = _split(item)
        if key not in used:
            raise PlotError(f"--param {item}: none of the losses has a parameter {key!r}")
    return resolved


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise PlotError(f"parameter {item!r} is not NAME=VALUE")
    return key.strip(), value.strip()


def _value(param: ParamInfo, text: str, loss: str) -> Any:
    where = f"{loss}: {param.name}={text}"
    try:
        if param.type == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if param.type == "int64":
            return int(text)
        if param.type == "double_list":
            values = json.loads(text if text.startswith("[") else f"[{text}]")
            return [float(v) for v in values]
        return float(text)
    except ValueError:
        raise PlotError(f"{where}: not a {param.type}") from None


def _kind(info: LossInfo, params: dict[str, Any]) -> str:
    """The effective kind of the predictions (``from_logits`` and ``log_predictions``
    change it) as one of the grid kinds."""
    def setting(name: str) -> bool:
        param = info.param(name)
        value = params.get(name, None if param is None else param.default)
        return bool(value)

    if setting("from_logits"):
        return "logits"
    if setting("log_predictions"):
        return "log_probabilities"
    kind = info.predictions.kind
    if kind in ("logits", "scores"):
        return "logits"
    if kind in ("probabilities", "log_probabilities"):
        return kind
    return "values"


def _structure(info: LossInfo) -> str:
    if info.class_axis_last:
        return "class"
    if info.targets.kind in ("signed_labels", "probabilities", "class_indices"):
        return "binary"
    return "values"


def _grid(kind: str, targets: Sequence[float]) -> np.ndarray:
    if kind == "values":
        return np.linspace(min(targets) - 3.0, max(targets) + 3.0, POINTS)
    if kind == "logits":
        return np.linspace(-4.0, 4.0, POINTS)
    p = np.linspace(0.002, 0.998, POINTS)
    return np.log(p) if kind == "log_probabilities" else p


def _inputs(info: LossInfo, kind: str, x: np.ndarray, target: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets for one curve (class losses: two-class rows)."""
    if not info.class_axis_last:
        return x, np.full_like(x, target)
    if kind == "logits":
        rows = np.stack([x, np.zeros_like(x)], axis=1)
    elif kind == "log_probabilities":
        rows = np.stack([x, np.log1p(-np.exp(x))], axis=1)
    else:
        rows = np.stack([x, 1.0 - x], axis=1)
    if info.targets.kind == "class_indices":
        return rows, np.full(x.size, int(target), dtype=np.int64)
    # dense targets: target 0 puts the mass on the varied entry, 1 on the other
    q = 1.0 - float(np.clip(target, 0.0, 1.0))
    return rows, np.tile([q, 1.0 - q], (x.size, 1))


def curves(client: LossClient, resolved: Sequence[tuple[LossInfo, LossRequest]],
           targets: Sequence[float] | None = None) -> list[Panel]:
    """Call the server for every loss and target; group the curves into panels."""
    panels: dict[tuple[str, str], Panel] = {}
    several = len(resolved) > 1
    for info, request in resolved:
        kind, structure = _kind(info, request.params), _structure(info)
        chosen = targets or _DEFAULT_TARGETS[structure][several]
        x = _grid(kind, chosen)
        panel = panels.setdefault((kind, structure), Panel(kind, structure))
        fixed = info.alias_params.get(request.name, {})  # said by the alias's name
        shown = {k: v for k, v in request.params.items() if k not in fixed}
        label = request.name + (" (" + ", ".join(
            f"{k}={_show(v)}" for k, v in shown.items()) + ")" if shown else "")
        for target in chosen:
            panel.curves.append(_curve(client, info, request, kind, x, float(target), label))
    return list(panels.values())


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


def _curve(client: LossClient, info: LossInfo, request: LossRequest, kind: str,
           x: np.ndarray, target: float, label: str) -> Curve:
    """One call on the whole grid. When the server names a prediction outside the loss's
    domain (e.g. one that must be positive), the grid is cut there: after it when it is
    not the first point, else before the first point that the server accepts (found by
    bisection, assuming the domain is an interval). A few rounds at most."""
    lo, hi = 0, x.size
    for _ in range(6):
        try:
            return _call(client, info, request, kind, x[lo:hi], target, label)
        except InvalidArgumentError as err:
            bad = _bad_index(err, info)
            if bad is None:
                raise
            if bad > 0:
                hi = lo + bad
            else:
                lo = _first_valid(client, info, request, kind, x, target, lo + 1, hi)
            if hi - lo < 3:
                break
    raise PlotError(f"{request.name}: no prediction range in its domain")


def _call(client: LossClient, info: LossInfo, request: LossRequest, kind: str,
          x: np.ndarray, target: float, label: str) -> Curve:
    predictions, targets = _inputs(info, kind, x, target)
    result = client.compute_gradient(request.name, predictions, targets, reduction="none",
                                     **request.params)
    grad = np.asarray(result.gradient)
    grad = grad[:, 0] if info.class_axis_last else grad
    return Curve(label, target, x, np.asarray(result.loss, dtype=np.float64),
                 grad.astype(np.float64))


def _first_valid(client: LossClient, info: LossInfo, request: LossRequest, kind: str,
                 x: np.ndarray, target: float, lo: int, hi: int) -> int:
    """The first index in [lo, hi) whose point the server accepts (hi if none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            _call(client, info, request, kind, x[mid:mid + 1], target, "")
            hi = mid
        except InvalidArgumentError as err:
            if _bad_index(err, info) is None:
                raise
            lo = mid + 1
    return lo


def _bad_index(err: InvalidArgumentError, info: LossInfo) -> int | None:
    """The grid point the server rejected (``predictions.data[i]``: of the flat data, so
    row i // 2 for two-class rows), if that was the error."""
    match = re.fullmatch(r"predictions\.data\[(\d+)\]", err.field or "")
    if match is None:
        return None
    return int(match.group(1)) // (2 if info.class_axis_last else 1)


def draw(panels: Sequence[Panel], path: str, *, dpi: int = 100) -> None:
    """Write the figure: one column per panel, the loss above its gradient."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("lossgrad plot needs matplotlib: pip install 'lossgrad[plot]'") from None
    fig = Figure(figsize=(4.6 * len(panels), 6.0), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
    for col, panel in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        colors: dict[str, str] = {}
        targets = sorted({c.target for c in panel.curves}, key=[c.target for c in
                                                                 panel.curves].index)
        for curve in panel.curves:
            color = colors.setdefault(curve.label, f"C{len(colors)}")
            style = _STYLES[targets.index(curve.target) % len(_STYLES)]
            name = curve.label + (f", {_target_name(panel, curve.target)}"
                                  if len(targets) > 1 else "")
            top.plot(curve.x, curve.loss, style, color=color, label=name, linewidth=1.6)
            bottom.plot(curve.x, curve.gradient, style, color=color, linewidth=1.6)
        title = _XLABELS.get(panel.kind, panel.kind)
        if len(targets) == 1:
            title += f" ({_target_name(panel, targets[0])})"
        top.set_title(title, fontsize=10)
        top.set_ylabel("loss")
        bottom.set_ylabel("d loss / d prediction")
        bottom.set_xlabel(_xlabel(panel))
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.axhline(0.0, color="black", linewidth=0.6)
        top.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)


def _target_name(panel: Panel, target: float) -> str:
    if panel.structure == "class":
        return "true class" if target == 0 else "wrong class"
    if panel.structure == "binary":
        return "positive target" if target == 1 else "negative target"
    return f"target {target:g}"


def _xlabel(panel: Panel) -> str:
    label = _XLABELS.get(panel.kind, panel.kind)
    return f"{label} of class 0 (2 classes)" if panel.structure == "class" else label


def plot(target: str | None, losses: Sequence[str], params: Sequence[str], output: str,
         targets: Sequence[float] | None = None,
         start_server: Callable[[], tuple[Any, str]] | None = None) -> None:
    """Draw ``losses`` from the server at ``target``, or from a server started on a
    loopback port for the duration (``start_server`` returns it and its address)."""
    server = None
    if target is None:
        if start_server is None:
            raise PlotError("no server: give --target")
        server, target = start_server()
    try:
        with LossClient(target, timeout=120) as client:
            resolved = resolve(client.list_losses(), losses, params)
            panels = curves(client, resolved, targets)
    finally:
        if server is not None:
            server.stop(0).wait()
    draw(panels, output)
