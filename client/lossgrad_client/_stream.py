"""ComputeStream on the client: one request cut into chunks, results put back together.

Shared by LossClient and AsyncLossClient, which differ only in how they send and
receive. The arrays are cut along their leading rows after the axes before the last
are merged (a (batch, sequence, vocabulary) tensor is sent as batch x sequence rows of
vocabulary values), so a chunk can be as small as one position. Each chunk's bytes are
copied once, into its message; the gradient is written once, into ``out``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._types import GradientResult, LossResult
from ._wire import (
    ComputeRequest,
    StreamRequest,
    StreamResponse,
    Tensor,
    WireError,
    parse_stream_response,
    wire_dtype,
)
from .errors import InternalError, InvalidArgumentError

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_STREAM_THRESHOLD_BYTES = 32 * 1024 * 1024

Progress = Callable[[int, int], None]
"""``progress(bytes_sent, bytes_total)``, called after each chunk is handed to gRPC."""


def stream_sizes(max_message_bytes: int, threshold: int | None,
                 chunk_bytes: int) -> tuple[int, int]:
    """(threshold, chunk size) in bytes: half a message each at most, so that a chunk's
    gradient fits a response too. The default threshold is 32 MiB: from there on a
    stream is as fast as one message, and the server's memory follows the chunk instead
    of holding the message ~4 times (gRPC's buffer, the Python bytes, the gradient, the
    response)."""
    half = max(1, max_message_bytes // 2)
    if chunk_bytes < 1:
        raise ValueError(f"stream_chunk_bytes must be >= 1, got {chunk_bytes}")
    if threshold is None:
        threshold = min(half, DEFAULT_STREAM_THRESHOLD_BYTES)
    return threshold, min(chunk_bytes, half)


def streams(request: ComputeRequest, stream: bool | None, threshold: int) -> bool:
    """Whether a request goes by ComputeStream: ``stream`` when given, else whether its
    tensors exceed ``threshold``. Never with a Hessian or a variance (ComputeStream
    carries neither): InvalidArgumentError for ``stream=True`` then."""
    for name, given in (("hessian", bool(request.hessian)),
                        ("variance", request.variance is not None)):
        if given:
            if stream:
                raise InvalidArgumentError(
                    f"{name}: ComputeStream carries no {name}; call without stream=True",
                    reason="INVALID_ARGUMENT", field=name)
            return False
    return request_bytes(request) > threshold if stream is None else stream


def with_out(result: GradientResult, out: Any) -> GradientResult:
    """A unary result whose gradient is copied into ``out`` (when given)."""
    if out is None:
        return result
    grad = check_out(out, result.gradient.shape, result.gradient.dtype)
    np.copyto(grad, result.gradient)
    return dataclasses.replace(result, gradient=grad)


def request_bytes(request: ComputeRequest) -> int:
    """The tensor bytes of a request: what decides between unary and stream."""
    return sum(memoryview(t.data).nbytes for t in (request.predictions, request.targets,
                                                   request.sample_weight) if t is not None)


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``out`` if it can take the gradient in place (shape, dtype, C order, writable)."""
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = (f"{type(out).__name__}" if not isinstance(out, np.ndarray)
               else f"{out.dtype} {out.shape}")
        raise InvalidArgumentError(
            f"out: needs a writable C-contiguous {dtype} array of shape {shape}, got {got}",
            reason="INVALID_ARGUMENT", field="out")
    return out


def _view(tensor: Tensor) -> npt.NDArray[Any]:
    dtype = wire_dtype(tensor.dtype)
    assert dtype is not None  # the request was built from arrays of these dtypes
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


class StreamPlan:
    """One streamed call: the header, the chunks, and the results as they come back."""

    def __init__(self, request: ComputeRequest, *, gradient: bool, chunk_bytes: int,
                 out: Any = None, progress: Progress | None = None) -> None:
        assert request.predictions is not None and request.targets is not None
        x = _view(request.predictions)
        t = _view(request.targets)
        w = None if request.sample_weight is None else _view(request.sample_weight)
        self.shape, self.dtype = x.shape, x.dtype
        self.arrays = _merged_rows(x, t, w)
        self.rows = self.arrays["predictions"].shape[0]
        self.row_bytes = sum(a[:1].nbytes for a in self.arrays.values())
        self.total_bytes = sum(a.nbytes for a in self.arrays.values())
        self.chunk_rows = max(1, chunk_bytes // max(1, self.row_bytes))
        self.gradient = gradient
        self.reduction = request.reduction
        self.progress = progress
        self.sent = 0
        self.grad: npt.NDArray[Any] | None = None
        if gradient:
            out = np.empty(x.shape, x.dtype) if out is None else check_out(out, x.shape,
                                                                           x.dtype)
            self.grad = out
        self.losses: npt.NDArray[Any] | None = None
        self.loss_shape: tuple[int, ...] = self.shape
        self.grad_rows = self.loss_rows = 0
        self.ready: pb.ComputeStreamReady | None = None
        self.summary: pb.ComputeLossResponse | None = None
        header = pb.ComputeStreamHeader(
            loss=request.loss, reduction=pb.Reduction.ValueType(request.reduction),
            allow_nonfinite=request.allow_nonfinite, gradient=gradient)
        if request.params is not None:
            header.params.CopyFrom(request.params)
        for name, array in self.arrays.items():
            declared = getattr(header, name)
            declared.dtype = getattr(request, name).dtype
            declared.shape.extend(array.shape)
        if w is not None and self.arrays["predictions"].shape != x.shape:  # axes merged
            header.given_predictions_shape.extend(x.shape)
            header.given_sample_weight_shape.extend(w.shape)
        self.header = StreamRequest(header=header)

    def messages(self) -> Iterator[StreamRequest]:
        """The chunks after the header (``ready`` must have come)."""
        assert self.ready is not None
        block = max(1, self.ready.block_rows)
        rows = self.chunk_rows if self.chunk_rows < block else self.chunk_rows // block * block
        if self.ready.weight_pass:
            names = ["sample_weight"] if "sample_weight" in self.arrays else []
            if self.ready.weight_pass_targets:
                names.append("targets")
            self.total_bytes += sum(self.arrays[name].nbytes for name in names)
            yield from self._chunks(names, rows)
        yield from self._chunks(list(self.arrays), rows)

    def _chunks(self, names: list[str], rows: int) -> Iterator[StreamRequest]:
        for lo in range(0, self.rows, rows):
            parts = {name: Tensor.of(self.arrays[name][lo:lo + rows]) for name in names}
            yield StreamRequest(predictions=parts.get("predictions"), targets=parts.get("targets"),
                                sample_weight=parts.get("sample_weight"))
            self.sent += sum(memoryview(p.data).nbytes for p in parts.values())
            if self.progress is not None:
                self.progress(self.sent, self.total_bytes)

    def receive(self, data: bytes) -> None:
        """Take one response's bytes: ready, a gradient/losses chunk, or the summary."""
        try:
            response = parse_stream_response(data)
        except WireError as err:
            raise InternalError(f"malformed response from the server: {err}",
                                field=err.field) from err
        if response.ready is not None:
            self.ready = response.ready
            self.loss_shape = self.shape[:-1] if response.ready.class_axis_last else self.shape
        if response.summary is not None:
            self.summary = response.summary
        self._put_gradient(response)
        self._put_losses(response)

    def _put_gradient(self, response: StreamResponse) -> None:
        if response.gradient is None:
            return
        part = _view(response.gradient).reshape(-1)
        grad = self.grad
        if grad is None or self.grad_rows + part.size > grad.size:
            raise InternalError("the server sent more gradient than requested",
                                field="gradient")
        grad.reshape(-1)[self.grad_rows:self.grad_rows + part.size] = part
        self.grad_rows += part.size

    def _put_losses(self, response: StreamResponse) -> None:
        if response.losses is None:
            return
        part = _view(response.losses).reshape(-1)
        if self.losses is None:
            self.losses = np.empty(math.prod(self.loss_shape), part.dtype)
        if self.loss_rows + part.size > self.losses.size:
            raise InternalError("the server sent more losses than requested", field="losses")
        self.losses[self.loss_rows:self.loss_rows + part.size] = part
        self.loss_rows += part.size

    def _loss(self) -> float | npt.NDArray[Any]:
        assert self.summary is not None
        if self.reduction != pb.REDUCTION_NONE:
            return float(self.summary.loss)
        if self.losses is None or self.loss_rows != self.losses.size:
            raise InternalError("the server's per-position losses are incomplete",
                                field="losses")
        return self.losses.reshape(self.loss_shape)

    def loss_result(self) -> LossResult:
        summary = self._finished()
        return LossResult(self._loss(), summary.positions, summary.positions_counted,
                          summary.weight_sum)

    def gradient_result(self) -> GradientResult:
        summary = self._finished()
        assert self.grad is not None
        if self.grad_rows != self.grad.size:
            raise InternalError("the server's gradient is incomplete", field="gradient")
        return GradientResult(self._loss(), self.grad, summary.positions,
                              summary.positions_counted, summary.weight_sum)

    def _finished(self) -> pb.ComputeLossResponse:
        if self.summary is None:
            raise InternalError("the stream ended without a summary", field="summary")
        return self.summary


def _merged_rows(x: npt.NDArray[Any], t: npt.NDArray[Any],
                 w: npt.NDArray[Any] | None) -> dict[str, npt.NDArray[Any]]:
    """The arrays with the axes before the last merged into rows (views; batch-axis
    weights are repeated per row, O(rows)). Shapes that do not fit are sent as they are,
    for the server to name what is wrong."""
    arrays = {"predictions": x, "targets": t}
    if w is not None:
        arrays["sample_weight"] = w
    if x.ndim < 3:
        return arrays
    rows = math.prod(x.shape[:-1])
    merged: dict[str, npt.NDArray[Any]] = {"predictions": x.reshape(rows, x.shape[-1])}
    for name, a in (("targets", t), ("sample_weight", w)):
        if a is None:
            continue
        if a.shape == x.shape:
            merged[name] = a.reshape(rows, x.shape[-1])
        elif a.shape == x.shape[:-1]:
            merged[name] = a.reshape(rows)
        elif name == "sample_weight" and a.shape == x.shape[:1]:
            merged[name] = np.repeat(a, rows // x.shape[0])
        else:
            return arrays
    return merged
