"""Plugin losses: what an installed package provides to add a loss, and their loading.

A package adds losses by declaring an entry point in the ``lossgrad.losses`` group whose
object is a :class:`Loss` or a sequence of them::

    [project.entry-points."lossgrad.losses"]
    fair = "lossgrad_fair:LOSSES"

A :class:`Loss` gives the name, aliases, parameters (typed, with defaults and ranges), the
inputs it takes and one element function ``f(x, y, *params) -> (loss, d loss / d x)``,
written in the subset of Python that numba compiles, and optionally a second one,
``h(x, y, *params) -> d^2 loss / d x^2``, for ComputeGradient's ``hessian`` option.
The engine runs them in the drivers of the built-in elementwise losses, so a plugin loss
gets their validation, sample weights, reductions, NaN/Inf checks, serial and parallel
paths and bit-for-bit determinism. Clients only name the loss: code never travels over
the wire.

Plugins load once per process: at server start, by ``lossgrad compile``/``losses``, or at
the first ``lossgrad.compute`` call. A plugin whose object is not valid, whose names clash
with a built-in loss or another plugin, or whose function does not compile stops the start
with a :class:`PluginError` naming the entry point (``errors="fail"``, the default); with
``errors="skip"`` it is left out, logged and listed in :attr:`PluginReport.failed` (which
GetServerInfo shows) while the others load.

Math for element functions: :func:`exp`, :func:`log`, :func:`log1p`, :func:`softplus` and
:func:`sigmoid` (from ``lossgrad.kernels.elementary``) replace the ``math`` module's, whose
libm calls keep the driver's loop from vectorising; ``math.sqrt``, ``abs``, ``min`` and
``max`` compile to instructions and are fine as they are. :func:`fconst` writes a constant
in the input's float type.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

from . import catalog
from .kernels._numerics import fconst
from .kernels.elementary import exp, log, log1p, sigmoid, softplus
from .kernels.plugin import python_function
from .params import coerce_param
from .specs import (
    ALL_HESSIAN_MODES,
    InputKind,
    InputSpec,
    Layout,
    LossSpec,
    ParamSpec,
    ParamType,
    PluginSource,
)

__all__ = ["GROUP", "Input", "Loss", "Param", "PluginError", "PluginReport", "exp", "fconst",
           "load", "log", "log1p", "sigmoid", "softplus"]

GROUP = "lossgrad.losses"
ENV_PLUGINS = "LOSSGRAD_PLUGINS"
ENV_PLUGIN_ERRORS = "LOSSGRAD_PLUGIN_ERRORS"

FLOAT_DTYPES = ("float32", "float64")
_PARAM_TYPES = {"double": ParamType.DOUBLE, "bool": ParamType.BOOL, "int64": ParamType.INT64}
# Input kinds an element function can take without help from the engine (probabilities
# and labels need value checks and mappings that only the built-in kernels do).
_KINDS = ("values", "scores", "logits")
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

_log = logging.getLogger("lossgrad.plugin")


@dataclass(frozen=True)
class Param:
    """A scalar parameter. ``type`` is "double", "bool" or "int64"; the element function
    gets it in the predictions' float type (bools as 0.0/1.0), after the position of x and
    y, in the order of :attr:`Loss.params`. ``default`` is required and must satisfy the
    range."""

    name: str
    default: float | bool | int
    description: str
    type: str = "double"
    minimum: float | None = None
    minimum_inclusive: bool = True
    maximum: float | None = None
    maximum_inclusive: bool = True


@dataclass(frozen=True)
class Input:
    """An input tensor: ``kind`` is "values", "scores" or "logits"; ``dtypes`` are those
    accepted (predictions: float32/float64; targets may add int32/int64, converted to the
    predictions' type)."""

    kind: str = "values"
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    description: str = "real values, any shape with >= 1 dimension"


_SAME_SHAPE = Input("values", FLOAT_DTYPES,
                    "real values, same shape as predictions (integers are converted)")


@dataclass(frozen=True)
class Loss:
    """One plugin loss, computed element by element.

    ``elementwise(x, y, *params)`` takes one prediction and one target in the predictions'
    float type (float32 or float64) and returns ``(loss, d loss / d x)``. It must be a
    function defined at the top level of an importable module (a numba ``njit`` function
    is fine too), compile in numba's nopython mode, and have no branches that depend on
    anything but its arguments. Constants such as ``2.0`` make float32 math run in
    float64; :func:`fconst` ``(x, 2.0)`` keeps the input's type. Use this module's
    :func:`exp`, :func:`log`, :func:`log1p`, :func:`softplus` and :func:`sigmoid` rather
    than ``math``'s, which are scalar calls that stop the loop from vectorising.

    ``hessian(x, y, *params)``, written the same way, returns d^2 loss / d x^2; with it
    the loss supports ComputeGradient's ``hessian`` option in all modes (exact, clipped
    to a floor, constant), run by the built-in Hessian driver. The first line of its
    docstring is the Hessian's description in ListLosses.
    """

    name: str
    elementwise: Callable[..., Any]
    description: str
    reference: str = ""
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()
    predictions: Input = Input()
    targets: Input = _SAME_SHAPE
    hessian: Callable[..., Any] | None = None


class PluginError(RuntimeError):
    """A plugin failed to load; the message names its entry point and the problem."""


@dataclass(frozen=True)
class PluginFailure:
    source: PluginSource
    error: str


@dataclass(frozen=True)
class PluginReport:
    """What :func:`load` found: the entry points loaded and those skipped."""

    loaded: tuple[PluginSource, ...] = ()
    failed: tuple[PluginFailure, ...] = ()
    enabled: bool = True

    def to_proto(self) -> pb.PluginStatus:
        return pb.PluginStatus(
            loaded=[source_proto(s) for s in self.loaded],
            failed=[pb.PluginFailure(source=source_proto(f.source), error=f.error)
                    for f in self.failed])


def source_proto(source: PluginSource) -> pb.PluginSource:
    """The PluginSource message of ``source``."""
    return pb.PluginSource(entry_point=source.entry_point, distribution=source.distribution,
                           version=source.version)


@dataclass
class _Prepared:
    source: PluginSource
    specs: list[LossSpec] = field(default_factory=list)
    drivers: list[tuple[Any, tuple[str, ...]]] = field(default_factory=list)
    hessians: list[Any] = field(default_factory=list)  # a driver or None, per loss


_LOCK = threading.Lock()
_REPORT: PluginReport | None = None


def report() -> PluginReport | None:
    """The report of the plugins loaded in this process, or None before :func:`load`."""
    return _REPORT


def ensure_loaded() -> None:
    """Load the plugins with the environment's settings unless that is done."""
    if _REPORT is None:
        load()


def load(*, enabled: bool | None = None, errors: str | None = None,
         entry_points: Sequence[metadata.EntryPoint] | None = None) -> PluginReport:
    """Find, check, compile and register the plugin losses; once per process (later calls
    return the first report, whatever their arguments).

    ``enabled`` (default: env LOSSGRAD_PLUGINS, on) turns plugin loading off;
    ``errors`` (default: env LOSSGRAD_PLUGIN_ERRORS, "fail") is "fail" to raise
    :class:`PluginError` on the first broken plugin, before any is registered, or "skip"
    to leave broken ones out. ``entry_points`` replaces the installed ones of
    :data:`GROUP`.
    """
    global _REPORT
    with _LOCK:
        if _REPORT is not None:
            return _REPORT
        if enabled is None:
            enabled = os.environ.get(ENV_PLUGINS, "1").strip().lower() not in (
                "0", "false", "no", "off")
        errors = errors or os.environ.get(ENV_PLUGIN_ERRORS, "fail")
        if errors not in ("fail", "skip"):
            raise ValueError(f"plugin errors must be 'fail' or 'skip', got {errors!r}")
        if not enabled:
            _REPORT = PluginReport(enabled=False)
            return _REPORT
        found = _installed() if entry_points is None else list(entry_points)
        prepared, failed = _prepare_all(found)
        if failed and errors == "fail":
            raise PluginError("; ".join(f"{_describe(f.source)}: {f.error}" for f in failed)
                              + f" (start with {ENV_PLUGIN_ERRORS}=skip to serve without it)")
        for failure in failed:
            _log.error("plugin %s skipped: %s", _describe(failure.source), failure.error)
        _register(prepared)
        _REPORT = PluginReport(tuple(p.source for p in prepared), tuple(failed))
        for p in prepared:
            _log.info("plugin %s: %s", _describe(p.source), ", ".join(s.name for s in p.specs))
        return _REPORT


def _installed() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: (ep.name, ep.value))


def _describe(source: PluginSource) -> str:
    return f"{source.entry_point!r} ({source.distribution} {source.version})".replace(
        " ()", "")


def _source(ep: metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else ""
    version = dist.version if dist is not None else ""
    return PluginSource(f"{ep.name} = {ep.value}", name or "", version or "")


def _prepare_all(found: Sequence[metadata.EntryPoint]
                 ) -> tuple[list[_Prepared], list[PluginFailure]]:
    """Load and check every entry point; the names of those that pass are reserved
    against the later ones."""
    taken = set(catalog.taken_names())
    prepared: list[_Prepared] = []
    failed: list[PluginFailure] = []
    for ep in found:
        source = _source(ep)
        try:
            item = _prepare(ep, source, taken)
        except Exception as err:  # noqa: BLE001 - any failure of plugin code is reported
            failed.append(PluginFailure(source, _summary(err)))
            continue
        for spec in item.specs:
            taken.update((spec.name, *spec.aliases))
        prepared.append(item)
    return prepared, failed


def _summary(err: BaseException) -> str:
    """The error's type and its first lines (numba's typing errors run to pages)."""
    text = str(err).strip() or type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: " + " | ".join(lines[:4])


def _prepare(ep: metadata.EntryPoint, source: PluginSource, taken: set[str]) -> _Prepared:
    from .kernels.plugin import elementwise_driver

    obj = ep.load()
    losses = [obj] if isinstance(obj, Loss) else obj
    if not isinstance(losses, (list, tuple)) or not losses or not all(
            isinstance(loss, Loss) for loss in losses):
        raise TypeError(f"the entry point's object must be a lossgrad.plugin.Loss or a "
                        f"non-empty list of them, got {type(obj).__name__}")
    item = _Prepared(source)
    mine: set[str] = set()
    for loss in losses:
        spec = _spec(loss, source)
        names = (spec.name, *spec.aliases)
        clash = sorted((set(names) & (taken | mine)) | {n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"loss {loss.name!r}: name(s) {', '.join(clash)} already taken "
                             "(by a built-in loss or another plugin)")
        mine.update(names)
        _check_function(loss, loss.elementwise, "elementwise")
        if loss.hessian is not None:
            _check_function(loss, loss.hessian, "hessian")
        driver, hessian = elementwise_driver(loss.name, loss.elementwise, len(loss.params),
                                             loss.hessian)
        item.specs.append(spec)
        item.drivers.append((driver, tuple(p.name for p in loss.params)))
        item.hessians.append(hessian)
    return item


def _spec(loss: Loss, source: PluginSource) -> LossSpec:
    for name in (loss.name, *loss.aliases):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"loss name {name!r} must match [a-z][a-z0-9_]*")
    if not loss.description:
        raise ValueError(f"loss {loss.name!r} needs a description")
    return LossSpec(
        loss.name, Layout.ELEMENTWISE, loss.description, loss.reference or "plugin",
        _input(loss.name, "predictions", loss.predictions, FLOAT_DTYPES),
        _input(loss.name, "targets", loss.targets, FLOAT_DTYPES + ("int32", "int64")),
        params=tuple(_param(loss.name, p) for p in loss.params),
        aliases=tuple(loss.aliases), plugin=source,
        hessian_modes=ALL_HESSIAN_MODES if loss.hessian is not None else (),
        hessian=_hessian_note(loss))


def _hessian_note(loss: Loss) -> str:
    """The first line of the Hessian function's docstring (ListLosses shows it)."""
    if loss.hessian is None:
        return ""
    doc = inspect.getdoc(python_function(loss.hessian)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "from the plugin"


def _input(loss: str, which: str, spec: Input, allowed: tuple[str, ...]) -> InputSpec:
    if spec.kind not in _KINDS:
        raise ValueError(f"loss {loss!r}: {which} kind {spec.kind!r} is not one of "
                         + ", ".join(_KINDS))
    bad = [d for d in spec.dtypes if d not in allowed]
    if bad or not spec.dtypes:
        raise ValueError(f"loss {loss!r}: {which} dtypes {list(spec.dtypes)} must be "
                         f"a non-empty subset of {list(allowed)}")
    return InputSpec(InputKind(spec.kind), tuple(spec.dtypes), spec.description)


# LossParams typed fields: a plugin parameter of the same name travels in that field, so
# it must have its type.
_TYPED_FIELDS = {
    f.name: ("double_list" if f.is_repeated else
             {f.TYPE_DOUBLE: "double", f.TYPE_BOOL: "bool", f.TYPE_INT64: "int64"}.get(f.type))
    for f in pb.LossParams.DESCRIPTOR.fields
}


def _param(loss: str, p: Param) -> ParamSpec:
    where = f"loss {loss!r}, parameter {p.name!r}"
    if not isinstance(p.name, str) or not _NAME.match(p.name) or p.name == "by_name":
        raise ValueError(f"{where}: the name must match [a-z][a-z0-9_]* (and not be by_name)")
    if p.type not in _PARAM_TYPES:
        raise ValueError(f"{where}: type {p.type!r} is not one of {', '.join(_PARAM_TYPES)}")
    typed = _TYPED_FIELDS.get(p.name)
    if typed is not None and typed != p.type:
        raise ValueError(f"{where}: LossParams.{p.name} is a {typed} field; a parameter of "
                         "that name must have that type")
    spec = ParamSpec(p.name, _PARAM_TYPES[p.type], p.default, p.description, p.minimum,
                     p.minimum_inclusive, p.maximum, p.maximum_inclusive)
    try:  # the requests' own check, on the default
        coerce_param(spec, "default", p.default)
    except ValueError as err:
        raise ValueError(f"{where}: bad default: {err}") from None
    return spec


def _check_function(loss: Loss, given: Callable[..., Any], role: str) -> None:
    fn = python_function(given)
    if not inspect.isfunction(fn):
        raise TypeError(f"loss {loss.name!r}: {role} must be a function, got "
                        f"{type(given).__name__}")
    wanted = 2 + len(loss.params)
    got = len(inspect.signature(fn).parameters)
    if got != wanted:
        raise TypeError(f"loss {loss.name!r}: {fn.__qualname__} takes {got} arguments; "
                        f"it must take (x, y{''.join(', ' + p.name for p in loss.params)})")


def _register(prepared: list[_Prepared]) -> None:
    from . import engine

    for item in prepared:
        for spec, (driver, names), hessian in zip(item.specs, item.drivers, item.hessians,
                                                  strict=True):
            catalog.register(spec)
            engine.register_runner(spec.name, _runner(driver, hessian, names))


def _runner(driver: Any, hessian: Any, names: tuple[str, ...]) -> Callable[..., Any]:
    from . import engine

    def run(batch: Any, want_grad: bool) -> Any:
        f = batch.x.dtype.type
        params = tuple(f(batch.params[n]) for n in names)
        if batch.hessian is not None:  # only requested where the spec lists modes
            return engine.run_hessian_kernel(batch, hessian, params)
        return engine.run_elementwise_kernel(batch, want_grad, driver, params)

    return run
