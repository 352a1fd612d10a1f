"""Metrics and access logs of every RPC: Prometheus counters, histograms and gauges, one
log line per call with its request id, and per-loss call counts for GetServerInfo.

Access lines go to the ``lossgrad.access`` logger, at INFO for a call that succeeded and at
WARNING for one that failed, so that the logger's level chooses between every call, failed
calls only (``lossgrad serve``'s default: a line per call costs about as much as the
metrics and the handler together at small sizes), or none.

:meth:`Telemetry.observe` wraps a unary handler, :meth:`Telemetry.observe_stream` a
stream-stream one (ComputeStream: one call, one access line, the elements of every chunk
counted as they arrive, the loss named by the header). Labels are bounded: ``method`` is one of
the service's methods, ``loss`` a catalog name (``unknown`` for a name the catalog does not
know, empty for calls without one) and ``code`` a gRPC status code name.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
from lossgrad_client._wire import ComputeRequest, StreamRequest, Tensor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import catalog
from ._proto.inference import grpc_predict_v2_pb2 as kpb
from .errors import LossgradError

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128
# Seconds: from a small loss on loopback (~100 us) to a 256 MiB request (seconds).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)

_access = logging.getLogger("lossgrad.access")


class Telemetry:
    """The metrics of one server, in their own registry (several servers in one process
    do not share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "loss", "code")
        self.requests = Counter("lossgrad_requests", "Calls, by method, loss and status code",
                                labels, registry=self.registry)
        self.errors = Counter("lossgrad_request_errors",
                              "Calls that ended with a status other than OK", labels,
                              registry=self.registry)
        self.latency = Histogram("lossgrad_request_duration_seconds",
                                 "Time in the handler, by method and loss", ("method", "loss"),
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.elements = Counter("lossgrad_elements",
                                "Tensor elements received (predictions, targets, weights)",
                                ("method", "loss"), registry=self.registry)
        self.bytes = Counter("lossgrad_tensor_bytes", "Tensor bytes received",
                             ("method", "loss"), registry=self.registry)
        self.in_flight = Gauge("lossgrad_in_flight_requests", "Calls being handled now",
                               ("method",), registry=self.registry)
        self.refused = Counter("lossgrad_refused_calls",
                               "Calls refused before a handler ran, by method and reason",
                               ("method", "reason"), registry=self.registry)
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._series: dict[tuple[str, str, grpc.StatusCode], _Series] = {}

    def loss_counts(self) -> dict[str, tuple[int, int]]:
        """(calls, failed calls) by catalog loss name, since the server started."""
        with self._lock:
            return {name: (calls, self._failures.get(name, 0))
                    for name, calls in self._calls.items()}

    def observe(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]
                ) -> Callable[[Any, grpc.ServicerContext], Any]:
        """Wrap a unary-unary ``behavior`` so that each call is measured and logged."""
        in_flight = self.in_flight.labels(method)

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            with _Observed(self, method, in_flight, context, _Tally(*_describe(request))):
                return behavior(request, context)

        return observed

    def observe_stream(
        self, method: str,
        behavior: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]],
    ) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]:
        """Wrap a stream-stream ``behavior`` so that each call is measured and logged
        once, when it ends (finished, failed, or cancelled by the client)."""
        in_flight = self.in_flight.labels(method)

        def observed(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            tally = _Tally()
            with _Observed(self, method, in_flight, context, tally):
                yield from behavior(tally.counted(requests), context)

        return observed

    def _record(self, method: str, loss: str, code: grpc.StatusCode, elapsed: float,
                elements: int, nbytes: int, request_id: str) -> None:
        key = (method, loss, code)
        series = self._series.get(key)
        if series is None:  # labels() costs microseconds; the label sets are few
            series = self._series.setdefault(key, _Series(
                self.requests.labels(method, loss, code.name),
                None if code is grpc.StatusCode.OK else
                self.errors.labels(method, loss, code.name),
                self.latency.labels(method, loss), self.elements.labels(method, loss),
                self.bytes.labels(method, loss)))
        series.requests.inc()
        if series.errors is not None:
            series.errors.inc()
        series.latency.observe(elapsed)
        if elements:
            series.elements.inc(elements)
            series.bytes.inc(nbytes)
        if loss:
            with self._lock:
                self._calls[loss] = self._calls.get(loss, 0) + 1
                if code is not grpc.StatusCode.OK:
                    self._failures[loss] = self._failures.get(loss, 0) + 1
        level = logging.INFO if code is grpc.StatusCode.OK else logging.WARNING
        if _access.isEnabledFor(level):
            fields = {"request_id": request_id, "method": method, "loss": loss,
                      "code": code.name, "elapsed_ms": round(elapsed * 1000, 3),
                      "elements": elements}
            _access.log(level, "%s %s %s %.3f ms %d elements request_id=%s", method,
                        loss or "-", code.name, elapsed * 1000, elements, request_id,
                        extra={"fields": fields})


class _Series(NamedTuple):
    """The metric children of one (method, loss, code)."""

    requests: Any
    errors: Any
    latency: Any
    elements: Any
    bytes: Any


class _Tally:
    """A call's loss label and the tensor elements and bytes it received; a stream's are
    counted as the handler reads its messages, the loss named by the header."""

    __slots__ = ("loss", "elements", "nbytes")

    def __init__(self, loss: str = "", elements: int = 0, nbytes: int = 0) -> None:
        self.loss = loss
        self.elements = elements
        self.nbytes = nbytes

    def counted(self, requests: Iterator[Any]) -> Iterator[Any]:
        for message in requests:
            if isinstance(message, StreamRequest):
                if message.header is not None:
                    self.loss = _loss_label(message.header.loss)
                elements, nbytes = _tensor_sizes(
                    (message.predictions, message.targets, message.sample_weight))
                self.elements += elements
                self.nbytes += nbytes
            elif isinstance(message, Exception) and not self.loss:  # malformed
                self.loss = "unknown"
            yield message
            del message  # not held while the next one is received


class _Observed:
    """``with _Observed(...):`` around a handler: in flight while inside, then recorded
    with the status it ended with (OK; the code of context.abort, else UNKNOWN;
    CANCELLED for a stream whose responses gRPC stopped reading)."""

    __slots__ = ("telemetry", "method", "in_flight", "context", "tally", "start",
                 "request_id")

    def __init__(self, telemetry: Telemetry, method: str, in_flight: Any,
                 context: grpc.ServicerContext, tally: _Tally) -> None:
        self.telemetry, self.method, self.in_flight = telemetry, method, in_flight
        self.context, self.tally = context, tally
        self.start = time.perf_counter()
        self.request_id = _request_id(context)

    def __enter__(self) -> None:
        self.in_flight.inc()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: Any) -> None:
        self.in_flight.dec()
        if kind is None:
            code = grpc.StatusCode.OK
        elif kind is GeneratorExit:
            code = grpc.StatusCode.CANCELLED
        else:
            aborted = self.context.code()  # set by context.abort
            code = aborted if isinstance(aborted, grpc.StatusCode) else \
                grpc.StatusCode.UNKNOWN
        tally = self.tally
        self.telemetry._record(self.method, tally.loss, code,
                               time.perf_counter() - self.start, tally.elements,
                               tally.nbytes, self.request_id)


def _tensor_sizes(tensors: tuple[Tensor | None, ...]) -> tuple[int, int]:
    """(elements from the declared shapes, data bytes) of the tensors that are set."""
    elements = nbytes = 0
    for tensor in tensors:
        if tensor is not None:
            count = 1
            for dim in tensor.shape:
                count *= max(dim, 0)
            elements += count
            nbytes += memoryview(tensor.data).nbytes
    return elements, nbytes


def _request_id(context: grpc.ServicerContext) -> str:
    """The caller's x-request-id (printable ASCII, at most 128 characters), or a new one;
    sent back in the trailing metadata (which goes out with the status, while initial
    metadata would cost a send of its own: ~0.1 ms per call)."""
    found = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            if 0 < len(value) <= _MAX_REQUEST_ID and value.isprintable() and value.isascii():
                found = value
            break
    # 128 random bits as 32 hex digits: unique enough for logs, without uuid4's
    # os.urandom call (a system call per request). The generator is reseeded in a fork.
    request_id = found or f"{random.getrandbits(128):032x}"
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


def _describe(request: Any) -> tuple[str, int, int]:
    """(loss label, elements, tensor bytes) of a request, from its declared shapes."""
    if isinstance(request, kpb.ModelInferRequest):
        return _describe_infer(request)
    if not isinstance(request, ComputeRequest):  # ListLosses, or a malformed message
        return ("" if not isinstance(request, Exception) else "unknown"), 0, 0
    elements, nbytes = _tensor_sizes((request.predictions, request.targets,
                                      request.sample_weight))
    return _loss_label(request.loss), elements, nbytes


_ITEMSIZES = {"FP32": 4, "FP64": 8, "INT32": 4, "INT64": 8}


def _describe_infer(request: kpb.ModelInferRequest) -> tuple[str, int, int]:
    """(loss label, elements, tensor bytes) of an Open Inference Protocol ModelInfer."""
    loss = _loss_label(request.model_name)
    elements = nbytes = 0
    raw = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        count = 1
        for dim in tensor.shape:
            count *= max(dim, 0)
        elements += count
        nbytes += len(raw[index]) if index < len(raw) else \
            count * _ITEMSIZES.get(tensor.datatype, 0)
    return loss, elements, nbytes


def _loss_label(name: str) -> str:
    try:
        return catalog.lookup(name).name
    except LossgradError:
        return "unknown"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and a record's
    ``fields``."""

    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)
