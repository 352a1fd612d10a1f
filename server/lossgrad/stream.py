"""ComputeStream: one request in chunks along the leading axis, O(chunk) memory, and the
bits of the unary call.

Why the bits match: the kernels sum float64 block sums in block order, over blocks
aligned to the start of the batch (``drivers``), and continue from a given ``start``.
The stream cuts the rows into *pieces* that begin on a block boundary (a multiple of
``block_rows`` rows), runs each piece through the engine with ``start`` = the total of
the pieces before, and so adds the same block sums in the same order as one call over
the whole batch. A chunk that ends inside a block leaves its last rows in a carry (a
copy of fewer than ``block_rows`` rows) that the next chunk completes. The weight
statistics (divisor of MEAN, positions counted) are resumable sums over blocks of
absolute positions, fed chunk by chunk as they come. When the gradient of a MEAN
depends on weights, a weight pass sends them (and class-index targets) first, so the
divisor is known before any gradient element is scaled: each element gets the unary
call's single rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from lossgrad_client import _wire
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

from . import catalog, engine, params, request, wire
from .catalog import Layout
from .errors import (
    EMPTY_BATCH,
    INVALID_LABELS,
    LABEL_OUT_OF_RANGE,
    MALFORMED_STREAM,
    MISSING_FIELD,
    NOT_STREAMABLE,
    SHAPE_MISMATCH,
    TOO_MANY_CHUNKS,
    TOO_MANY_ELEMENTS,
    UNSUPPORTED_DTYPE,
    VALUE_OUT_OF_RANGE,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from .kernels import _numerics as nm
from .kernels.classification import label_stats

_EMPTY_F8 = np.empty(0, dtype=np.float64)
_NO_IGNORE = np.iinfo(np.int64).min
_TENSORS = ("predictions", "targets", "sample_weight")


class StreamEndedError(InvalidArgumentError):
    """The client's messages ended before the rows its header declared. A stream the
    client cancelled looks the same to the handler until gRPC reports the cancellation."""


@dataclass(frozen=True)
class Declared:
    """A tensor the header declares: its dtype and full shape."""

    code: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def row(self) -> int:
        """Elements per leading row."""
        return math.prod(self.shape[1:])


def _declared(tensor: pb.Tensor, field: str) -> Declared:
    if len(tensor.data):
        raise InvalidArgumentError(f"{field}.data", "a header declares tensors without data",
                                   MALFORMED_STREAM)
    shape = tuple(tensor.shape)
    # Decoding an empty tensor of the same dtype checks the dtype and the dimensions.
    probe = wire.decode_tensor(_wire.Tensor(tensor.dtype, (0,), b""), field)
    if not shape:
        raise InvalidArgumentError(f"{field}.shape", "needs at least 1 dimension (the rows)",
                                   SHAPE_MISMATCH)
    for axis, dim in enumerate(shape):
        if dim <= 0:
            raise InvalidArgumentError(f"{field}.shape[{axis}]", f"is {dim}: empty or negative",
                                       EMPTY_BATCH)
    return Declared(tensor.dtype, probe.dtype, shape)


class StreamCall:
    """One ComputeStream call: feed it the parsed messages, it yields the responses."""

    def __init__(self, header: pb.ComputeStreamHeader, *, max_elements: int | None,
                 max_chunks: int) -> None:
        self.max_chunks = max_chunks
        self.spec = catalog.lookup(header.loss)
        self.params = params.resolve_params(self.spec, header.loss,
                                             wire.decode_params(header.params))
        self.reduction = wire.decode_reduction(header.reduction)
        self.want_grad = header.gradient
        self.allow_nonfinite = header.allow_nonfinite
        self.decl: dict[str, Declared] = {}
        for name in _TENSORS:
            if header.HasField(name):
                self.decl[name] = _declared(getattr(header, name), f"header.{name}")
            elif name != "sample_weight":
                raise InvalidArgumentError(f"header.{name}", "required tensor is not set",
                                           MISSING_FIELD)
        self.rows = self.decl["predictions"].shape[0]
        for name, d in self.decl.items():
            if d.shape[0] != self.rows:
                raise InvalidArgumentError(
                    f"header.{name}.shape[0]", f"{d.shape[0]} rows; the predictions have "
                    f"{self.rows} (every tensor is cut along the same leading axis)",
                    SHAPE_MISMATCH)
        total = sum(math.prod(d.shape) for d in self.decl.values())
        if max_elements is not None and total > max_elements:
            raise ResourceExhaustedError(
                "header", f"the tensors declare {total} elements; the limit is "
                f"{max_elements} per stream (--max-stream-elements)", TOO_MANY_ELEMENTS)
        self._check_given_shapes(header)
        self._check_header()
        x = self.decl["predictions"]
        self.sparse = self.spec.layout is Layout.SPARSE_ROWS
        elementwise = self.spec.layout is Layout.ELEMENTWISE
        self.inner = x.row if elementwise else x.row // x.shape[-1]  # positions per row
        self.positions = self.rows * self.inner
        if elementwise:  # units: elements; blocks of BLOCK elements
            self.block_units = nm.BLOCK
            self.block_rows = nm.BLOCK // math.gcd(nm.BLOCK, x.row)
            self.unit_size = {"predictions": 1, "targets": 1}
        else:  # units: class rows (positions); blocks of BLOCK // C rows
            self.block_units = max(1, nm.BLOCK // x.shape[-1])
            self.block_rows = self.block_units // math.gcd(self.block_units, self.inner)
            self.unit_size = {"predictions": x.shape[-1],
                              "targets": 1 if self.sparse else x.shape[-1]}
        ignore, cw = self.params.get("ignore_index"), self.params.get("class_weight")
        data_dependent = "sample_weight" in self.decl or (
            self.sparse and (ignore is not None or cw is not None))
        self.weight_pass = (self.want_grad and self.reduction is request.Reduction.MEAN
                            and data_dependent)
        self.weight_pass_targets = self.weight_pass and self.sparse and (
            ignore is not None or cw is not None)
        if self.sparse:
            self.cw = _EMPTY_F8 if cw is None else np.asarray(cw, dtype=np.float64)
            self.ignore = _NO_IGNORE if ignore is None else int(ignore)
            if self.cw.size and self.cw.size != x.shape[-1]:
                raise InvalidArgumentError(
                    "params.class_weight", f"has {self.cw.size} entries; predictions have "
                    f"{x.shape[-1]} classes", SHAPE_MISMATCH)
        self.chunks = 0
        self.total = 0.0  # running sum of w * loss, in block order
        self.divisor = float(self.positions)
        self.hinge_seen: dict[float, int] = {}  # label (0 or -1) -> first absolute index
        self._units_done = 0  # units (elements or class rows) fed to _feed so far
        self._carry: dict[str, np.ndarray] | None = None  # less than one block, copied
        self._carry_start = 0

    def _check_given_shapes(self, header: pb.ComputeStreamHeader) -> None:
        """The weights' shape as the caller gave it (before the client merged the leading
        axes into rows) gets the unary check: rows of (batch, sequence) weights are not
        per-element weights of (batch, sequence, features) predictions."""
        x = tuple(header.given_predictions_shape)
        w = tuple(header.given_sample_weight_shape)
        if not x or not w or "sample_weight" not in self.decl:
            return
        if math.prod(x) != math.prod(self.decl["predictions"].shape):
            raise InvalidArgumentError(
                "header.given_predictions_shape", f"{list(x)} has not the elements of the "
                f"declared {list(self.decl['predictions'].shape)}", SHAPE_MISMATCH)
        class_axis = self.spec.layout is not Layout.ELEMENTWISE
        request.check_weight_shape(w, x, x[:-1] if class_axis else x)

    def _check_header(self) -> None:
        """The unary validation, run on one row of each declared tensor (zeros)."""
        if self.spec.name == "rmse" and self.want_grad and \
                self.reduction is not request.Reduction.NONE:
            raise InvalidArgumentError(
                "header.gradient", "the rmse gradient needs the whole loss before the first "
                "element; use ComputeGradient, or stream mse", NOT_STREAMABLE)
        x, t = self.decl["predictions"], self.decl["targets"]
        w = self.decl.get("sample_weight")
        try:
            request.prepare_resolved(
                self.spec, dict(self.params), self.reduction,
                np.zeros((1,) + x.shape[1:], x.dtype), np.zeros((1,) + t.shape[1:], t.dtype),
                None if w is None else np.zeros((1,) + w.shape[1:], w.dtype),
                self.allow_nonfinite)
        except InvalidArgumentError as err:
            if err.field.startswith("params"):
                raise
            raise InvalidArgumentError(f"header.{err.field}", err.message, err.reason) from None

    def ready(self) -> _wire.StreamResponse:
        return _wire.StreamResponse(ready=pb.ComputeStreamReady(
            block_rows=self.block_rows, weight_pass=self.weight_pass,
            weight_pass_targets=self.weight_pass_targets,
            class_axis_last=self.spec.layout is not Layout.ELEMENTWISE))

    # --- the passes --------------------------------------------------------------------

    def run(self, messages: Iterator[_wire.StreamRequest]) -> Iterator[_wire.StreamResponse]:
        """The responses after ``ready``, for the messages after the header."""
        if self.weight_pass:
            stats = _Stats()
            done = 0
            while done < self.rows:
                chunk = self._next(messages, done, weights_only=True)
                done, _ = self._account(stats, chunk, done)
            self.divisor = stats.weight_sum
        stats = _Stats()
        done = 0
        while done < self.rows:
            chunk = self._next(messages, done, weights_only=False)
            done, flat_w = self._account(stats, chunk, done)
            responses = self._feed(self._units(chunk, flat_w), final=done == self.rows)
            del chunk, flat_w  # the chunk's message is released before the next arrives
            while responses:  # popped, so that no sent gradient stays referenced here
                yield responses.pop(0)
        if next(messages, None) is not None:
            raise InvalidArgumentError(f"chunk[{self.chunks}]", "sent after the last row",
                                       MALFORMED_STREAM)
        yield self._summary(stats)

    def _next(self, messages: Iterator[_wire.StreamRequest], done: int,
              weights_only: bool) -> dict[str, np.ndarray]:
        """The next chunk's arrays, checked against the header."""
        message = next(messages, None)
        field = f"chunk[{self.chunks}]"
        if message is None:
            what = "weight pass" if weights_only else "data pass"
            raise StreamEndedError(
                field, f"the stream ended after {done} of {self.rows} rows of the {what}",
                MALFORMED_STREAM)
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise InvalidArgumentError(
                field, f"more than {self.max_chunks} chunks (--max-stream-chunks)",
                TOO_MANY_CHUNKS)
        if message.header is not None:
            raise InvalidArgumentError(f"{field}.header", "a stream has one header, first",
                                       MALFORMED_STREAM)
        wanted = {"sample_weight"} & set(self.decl)
        if not weights_only:
            wanted |= {"predictions", "targets"}
        elif self.weight_pass_targets:
            wanted.add("targets")
        arrays: dict[str, np.ndarray] = {}
        for name in _TENSORS:
            tensor = getattr(message, name)
            if (tensor is not None) != (name in wanted):
                why = "is required" if name in wanted else "must not be set"
                raise InvalidArgumentError(
                    f"{field}.{name}", f"{why} in a {'weight' if weights_only else 'data'} "
                    "pass chunk", MISSING_FIELD if name in wanted else MALFORMED_STREAM)
            if tensor is not None:
                arrays[name] = self._chunk_array(tensor, name, field, done)
        rows = {a.shape[0] for a in arrays.values()}
        if len(rows) > 1:
            raise InvalidArgumentError(f"{field}", f"its tensors have different row counts "
                                       f"{sorted(rows)}", SHAPE_MISMATCH)
        return arrays

    def _chunk_array(self, tensor: _wire.Tensor, name: str, field: str,
                     done: int) -> np.ndarray:
        d = self.decl[name]
        where = f"{field}.{name}"
        if tensor.dtype != d.code:
            raise InvalidArgumentError(f"{where}.dtype", f"{tensor.dtype} differs from the "
                                       f"header's {d.code}", UNSUPPORTED_DTYPE)
        if len(tensor.shape) != len(d.shape) or tuple(tensor.shape[1:]) != d.shape[1:]:
            raise InvalidArgumentError(
                f"{where}.shape", f"{list(tensor.shape)}: a chunk has the header's trailing "
                f"dimensions {list(d.shape[1:])}", SHAPE_MISMATCH)
        if done + tensor.shape[0] > self.rows:
            raise InvalidArgumentError(
                f"{where}.shape[0]", f"{tensor.shape[0]} rows after {done}: more than the "
                f"{self.rows} declared", SHAPE_MISMATCH)
        return wire.decode_tensor(tensor, where)

    def _account(self, stats: _Stats, chunk: dict[str, np.ndarray],
                 done: int) -> tuple[int, np.ndarray]:
        """Feed a chunk's weights (and class indices) to ``stats``; return the rows after
        and the chunk's weights, one float64 per position (empty: none)."""
        rows = next(iter(chunk.values())).shape[0]
        w = chunk.get("sample_weight")
        flat = _EMPTY_F8
        if w is not None:
            flat = w.reshape(-1)
            if w.ndim == 1 and self.inner > 1:  # batch-axis weights: one per row
                flat = np.repeat(flat, self.inner)
            flat = np.ascontiguousarray(flat, dtype=np.float64)
        offset = done * self.inner
        if self.sparse and "targets" in chunk:
            t = chunk["targets"].reshape(-1).astype(np.int64, copy=False)
            if flat.size:
                self._check_weights(flat, w, done)
            bad, stats.total, stats.acc, count = label_stats(
                t, self.decl["predictions"].shape[-1], self.ignore, self.cw, flat, offset,
                stats.total, stats.acc)
            if bad >= 0:
                raise InvalidArgumentError(
                    f"targets.data[{offset + bad}]", f"class index {t[bad]} is outside [0, "
                    f"{self.decl['predictions'].shape[-1]})", LABEL_OUT_OF_RANGE)
            stats.counted += count
        elif flat.size:
            self._check_weights(flat, w, done)
            _, stats.total, stats.acc, count = nm.weight_stats(flat, offset, stats.total,
                                                               stats.acc)
            stats.counted += count
        else:
            stats.total += float(rows * self.inner)
            stats.counted += rows * self.inner
        return done + rows, flat

    def _units(self, chunk: dict[str, np.ndarray], flat_w: np.ndarray) -> dict[str, np.ndarray]:
        """A chunk as the kernels' units: elements (elementwise) or class rows, so that a
        carry never holds more than one block of BLOCK elements (or of class rows)."""
        x = chunk["predictions"]
        if self.spec.layout is Layout.ELEMENTWISE:
            units = {"predictions": x.reshape(-1), "targets": chunk["targets"].reshape(-1)}
        else:
            c = x.shape[-1]
            t = chunk["targets"]
            units = {"predictions": x.reshape(-1, c),
                     "targets": t.reshape(-1) if self.sparse else t.reshape(-1, c)}
        if flat_w.size:
            units["sample_weight"] = flat_w
        return units

    def _check_weights(self, flat: np.ndarray, w: Any, done: int) -> None:
        bad, _, _, _ = nm.weight_stats(flat, 0, 0.0, 0.0)
        if bad >= 0:
            index = bad // self.inner if w.ndim == 1 and self.inner > 1 else bad
            base = done * (1 if w.ndim == 1 else self.decl["sample_weight"].row)
            raise InvalidArgumentError(f"sample_weight.data[{base + index}]",
                                       f"{flat[bad]!r}: weights must be finite and >= 0",
                                       VALUE_OUT_OF_RANGE)

    def _feed(self, units: dict[str, np.ndarray], final: bool) -> list[_wire.StreamResponse]:
        """Run a chunk's units: first the carried block completed, then the part that
        ends on a block boundary (all of it in the ``final`` chunk); the rest is carried."""
        start = self._units_done
        self._units_done += next(iter(units.values())).shape[0]
        responses: list[_wire.StreamResponse] = []
        if self._carry is not None:  # complete the carried block first
            carry, carry_start = self._carry, self._carry_start
            take = min(self.block_units - (start - carry_start), self._units_done - start)
            joined = {k: np.concatenate((carry[k], v[:take])) for k, v in units.items()}
            units = {k: v[take:] for k, v in units.items()}
            start += take
            if start - carry_start < self.block_units and not final:
                self._carry = joined
                return responses
            self._carry = None
            responses += self._piece(joined, carry_start)
        n = self._units_done - start
        aligned = n if final else n - n % self.block_units
        if aligned:
            responses += self._piece({k: v[:aligned] for k, v in units.items()}, start)
        if aligned < n:  # copied: the chunk's message is released after this turn
            self._carry = {k: v[aligned:].copy() for k, v in units.items()}
            self._carry_start = start + aligned
        return responses

    def _piece(self, arrays: dict[str, np.ndarray], start: int) -> list[_wire.StreamResponse]:
        """Run units [start, start + len), which begin on a block boundary: no response
        or one, with the piece's gradient and/or per-position losses."""
        try:
            batch = request.prepare_resolved(
                self.spec, dict(self.params), self.reduction, arrays["predictions"],
                arrays["targets"], arrays.get("sample_weight"), self.allow_nonfinite)
            if self.spec.name in ("hinge", "squared_hinge"):
                self._check_hinge_labels(batch.t, start)
            batch.start = self.total
            batch.weight_sum = self.divisor
            result = engine.run(batch, self.want_grad)
        except InvalidArgumentError as err:
            raise self._absolute(err, start) from None
        self.total = result.total
        losses = result.loss if isinstance(result.loss, np.ndarray) else None
        if result.gradient is None and losses is None:
            return []
        return [_wire.StreamResponse(
            gradient=None if result.gradient is None else wire.encode_tensor(
                result.gradient.reshape(-1)),
            losses=None if losses is None else wire.encode_tensor(losses.reshape(-1)))]

    def _check_hinge_labels(self, t: np.ndarray, start: int) -> None:
        """{0, 1} in one piece and {-1, 1} in another are as invalid as in one request."""
        base = start * self.unit_size["targets"]
        for label in (0.0, -1.0):
            hits = np.flatnonzero(t == label)
            if hits.size and label not in self.hinge_seen:
                self.hinge_seen[label] = base + int(hits[0])
        if len(self.hinge_seen) == 2:
            bad = max(self.hinge_seen.values())
            raise InvalidArgumentError(
                f"targets.data[{bad}]", "hinge targets must be all in {-1, 1} or all in "
                "{0, 1}", INVALID_LABELS)

    def _absolute(self, err: InvalidArgumentError, start: int) -> InvalidArgumentError:
        """The error of a piece with its index into the whole tensor, as unary gives it."""
        name, _, rest = err.field.partition(".data[")
        if not rest or name not in self.unit_size:
            return err
        index = int(rest.rstrip("]")) + start * self.unit_size[name]
        return InvalidArgumentError(f"{name}.data[{index}]", err.message, err.reason)

    def _summary(self, stats: _Stats) -> _wire.StreamResponse:
        weight_sum = stats.weight_sum
        red = self.reduction
        if self.spec.name == "rmse" and red is not request.Reduction.NONE:
            divisor = weight_sum if red is request.Reduction.MEAN else 1.0
            loss = math.sqrt(self.total / divisor) if divisor > 0 else 0.0
        elif red is request.Reduction.SUM:
            loss = self.total
        elif red is request.Reduction.MEAN:
            loss = self.total / weight_sum if weight_sum > 0 else 0.0
        else:
            loss = 0.0
        return _wire.StreamResponse(summary=pb.ComputeLossResponse(
            loss=loss, positions=self.positions, positions_counted=stats.counted,
            weight_sum=weight_sum))


@dataclass
class _Stats:
    """Resumable weight statistics: finished blocks, the open block, non-zero weights."""

    total: float = 0.0
    acc: float = 0.0
    counted: int = 0

    @property
    def weight_sum(self) -> float:
        return self.total + self.acc
