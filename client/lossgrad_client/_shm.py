"""Client side of the shared-memory transport, for a client on the server's host (a
worker with lossgrad as a sidecar in its pod).

The client creates and owns its segments: files in a shared-memory directory
(``/dev/shm`` by default), each mapped once and registered once with the server (region
name = file name), reused for every call, unregistered and removed on ``close()`` (or,
should the client never be closed, removed when it is garbage-collected or the
interpreter exits). Two kinds:

- *staging* segments, one per call in flight, taken from a free list: the inputs that
  are not already in shared memory are copied in (one copy each), and the gradient (and
  REDUCTION_NONE losses) are written there by the server and copied out (one copy each)
  before the segment goes back to the list;
- *shared arrays* (:meth:`SharedMemoryTransport.shared_array`): memory the caller fills
  directly; an input that lies in one is sent by location, without a copy, and a
  ``gradient_out`` that is one receives the gradient from the server's kernel directly.

This module does no gRPC: :class:`Placement` lists the segments the client must
register before the call, so that the blocking and the asyncio clients share it.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ._convert import from_tensor
from ._proto.lossgrad.v1 import lossgrad_pb2 as pb
from ._shm_socket import SharedMemorySocketLink
from ._stream import check_out
from ._wire import (
    ComputeRequest,
    SharedMemoryLocation,
    Tensor,
    data_type,
    wire_dtype,
)
from .errors import InternalError, InvalidArgumentError

_STAGING_MIN_BYTES = 1 << 20
_ALIGN = 64  # each tensor of a staging segment starts on a cache line


@dataclass(frozen=True)
class SharedMemoryOptions:
    """How a client uses shared memory.

    ``directory`` must be the one the server opens keys in (``--shared-memory-dir``),
    e.g. a memory-backed volume both containers mount; ``key_prefix`` must start with
    the server's ``--shared-memory-key-prefix``. With ``socket``, calls go over the
    server's shared-memory socket (a Unix socket in ``directory``, a faster round trip
    than gRPC) when the server offers one, and over gRPC when it cannot be reached.
    Requests whose tensors total fewer than
    ``min_bytes`` go as bytes (below ~64 KiB gRPC moves them as fast), unless an input
    or ``gradient_out`` is a shared array. ``mode`` is the segments' file mode: 0o600
    needs the server to run as the same user, 0o660 the same group.
    """

    directory: str = "/dev/shm"
    key_prefix: str = "lossgrad"
    min_bytes: int = 65536
    mode: int = 0o600
    socket: bool = True


class Segment:
    """One file of shared memory, mapped read-write, with its byte array."""

    def __init__(self, options: SharedMemoryOptions, size: int) -> None:
        self.name = f"{options.key_prefix}-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(options.directory, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     options.mode)
        try:
            os.fchmod(fd, options.mode)  # not narrowed by the umask
            os.ftruncate(fd, size)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.size = size
        self.bytes: npt.NDArray[np.uint8] | None = np.frombuffer(self._mmap, np.uint8)
        self.address: int = self.bytes.ctypes.data
        self.registered = False
        self._remove = weakref.finalize(self, _unlink, path)

    def view(self, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
        assert self.bytes is not None
        nbytes = math.prod(shape) * dtype.itemsize
        return self.bytes[offset:offset + nbytes].view(dtype).reshape(shape)

    def destroy(self) -> None:
        """Remove the file and unmap (at once, or when the last array viewing it is freed)."""
        self._remove()
        self.bytes = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a shared array is still alive: unmapped when it is freed
            self._mmap = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class Placement:
    """One call's use of shared memory: the request to send (locations instead of bytes),
    the staging segment it holds, the segments it uses (registered before the call when
    they are not yet) and idle ones to unregister and remove after it."""

    request: ComputeRequest
    lease: Segment | None
    used: list[Segment]
    retired: list[Segment] = field(default_factory=list)
    gradient_out: npt.NDArray[Any] | None = None
    segments: dict[str, Segment] = field(default_factory=dict)

    def read(self, tensor: Tensor | None, name: str) -> npt.NDArray[Any]:
        """A response tensor as an array: a copy of what the server wrote into the staging
        segment, or ``gradient_out`` itself when the server wrote there."""
        location = None if tensor is None else tensor.shared_memory
        if tensor is None or location is None:
            return bytes_reader(self.gradient_out)(tensor, name)
        segment = self.segments.get(location.region)
        dtype = wire_dtype(tensor.dtype)
        nbytes = -1 if dtype is None else math.prod(tensor.shape) * dtype.itemsize
        if (segment is None or dtype is None or nbytes != location.byte_size
                or location.offset < 0 or location.offset + nbytes > segment.size):
            raise InternalError(f"malformed {name} location in the response: {location}",
                                field=name)
        view = segment.view(location.offset, dtype, tensor.shape)
        if segment is not self.lease and self.gradient_out is not None and name == "gradient":
            return self.gradient_out  # the server wrote it in place
        return _fill(self.gradient_out if name == "gradient" else None, view)


def bytes_reader(gradient_out: npt.NDArray[Any] | None) -> Reader:
    """How to read the tensors of a response that came as bytes: views of it, and the
    gradient copied into ``gradient_out`` when there is one."""
    if gradient_out is None:
        return from_tensor

    def read(tensor: Tensor | None, name: str) -> npt.NDArray[Any]:
        array = from_tensor(tensor, name)
        return _fill(gradient_out, array) if name == "gradient" else array

    return read


Reader = Callable[[Tensor | None, str], npt.NDArray[Any]]


def _fill(out: npt.NDArray[Any] | None, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` copied into ``out``, or into a new array."""
    if out is None:
        return array.copy()
    np.copyto(out, array)
    return out


def register_request(segment: Segment) -> pb.RegisterSharedMemoryRegionRequest:
    """The registration of a segment: all of it, under its file name."""
    return pb.RegisterSharedMemoryRegionRequest(name=segment.name, key="/" + segment.name,
                                                offset=0, byte_size=segment.size)


def unregister_request(segment: Segment) -> pb.UnregisterSharedMemoryRegionRequest:
    return pb.UnregisterSharedMemoryRegionRequest(name=segment.name)


def transport(shared_memory: bool | SharedMemoryOptions) -> SharedMemoryTransport | None:
    """The transport for a client's ``shared_memory`` argument (None: off)."""
    if shared_memory is False:
        return None
    return SharedMemoryTransport(
        SharedMemoryOptions() if shared_memory is True else shared_memory)


def check_gradient_out(out: Any, predictions: Tensor | None) -> npt.NDArray[Any] | None:
    """``out`` if it can take the predictions' gradient (their shape and dtype,
    C-contiguous, writable); checked before anything is sent."""
    if out is None:
        return None
    dtype = None if predictions is None else wire_dtype(predictions.dtype)
    if predictions is None or dtype is None:
        raise InvalidArgumentError("out: the predictions have no wire dtype", field="out")
    return check_out(out, predictions.shape, dtype)


class SharedMemoryTransport:
    """The segments of one client; thread-safe."""

    def __init__(self, options: SharedMemoryOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._free: list[Segment] = []  # idle staging segments
        self._closed = False
        self.link: SharedMemorySocketLink | None = None
        self.link_known = False  # whether the server was asked for its socket

    def use_socket(self, name: str, token: str | None) -> SharedMemorySocketLink | None:
        """Use the server's socket ``name`` (from GetServerInfo; empty: it has none)."""
        with self._lock:
            if not self.link_known:
                self.link_known = True
                if name and self.options.socket and os.path.basename(name) == name:
                    self.link = SharedMemorySocketLink(
                        os.path.join(self.options.directory, name), token)
            return self.link

    def shared_array(self, shape: int | tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """A new zeroed array in a segment of its own, registered at its first use."""
        dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        dt = np.dtype(dtype)
        if data_type(dt) is None or not dt.isnative or min(dims, default=1) < 0:
            raise InvalidArgumentError(
                f"shared_array: unsupported dtype {dt} or shape {list(dims)}; use "
                "float32/float64 (int32/int64 for class indices)", field="dtype")
        nbytes = math.prod(dims) * dt.itemsize
        segment = self._new(-(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE)
        return segment.view(0, dt, dims)

    def prepare(self, request: ComputeRequest, *, gradient: bool,
                gradient_out: npt.NDArray[Any] | None) -> Placement | None:
        """The request with its tensors and outputs in shared memory, or None when it
        should go as bytes (small, and nothing of it in shared memory)."""
        names = ("predictions", "targets", "sample_weight")
        tensors = {n: getattr(request, n) for n in names if getattr(request, n) is not None}
        with self._lock:
            if self._closed:
                raise InvalidArgumentError("the client is closed", field="shared_memory")
            found = {n: self._locate(t.data) for n, t in tensors.items()}
            out_location = None if gradient_out is None else self._locate(gradient_out.data)
            sizes = {n: memoryview(t.data).nbytes for n, t in tensors.items()}
            if (out_location is None and not any(found.values())
                    and sum(sizes.values()) < self.options.min_bytes):
                return None
            predictions = sizes.get("predictions", 0)
            copies = [n for n in tensors if found[n] is None]
            outputs = ((["gradient"] if gradient and out_location is None else [])
                       + (["losses"] if request.reduction == pb.REDUCTION_NONE else []))
            layout, offset = {}, 0
            for n in copies + outputs:
                layout[n] = offset
                offset += -(-max(sizes.get(n, predictions), 1) // _ALIGN) * _ALIGN
            lease, retired = self._acquire(offset) if layout else (None, [])
            segments = dict(self._segments)
        placed: dict[str, Any] = {}
        for n, tensor in tensors.items():
            location = found[n]
            if location is None:
                assert lease is not None and lease.bytes is not None
                start = layout[n]
                lease.bytes[start:start + sizes[n]] = np.frombuffer(tensor.data, np.uint8)
                location = SharedMemoryLocation(lease.name, start, sizes[n])
            placed[n] = Tensor(tensor.dtype, tensor.shape, b"", location)
        if gradient:
            placed["gradient_output"] = out_location or SharedMemoryLocation(
                lease.name if lease else "", layout.get("gradient", 0), predictions)
        if "losses" in layout:
            assert lease is not None
            placed["losses_output"] = SharedMemoryLocation(lease.name, layout["losses"],
                                                           predictions)
        used = {location.region for location in (*found.values(), out_location) if location}
        if lease is not None:
            used.add(lease.name)
        # vars() + the constructor: dataclasses.replace costs several times more per call
        return Placement(ComputeRequest(**{**vars(request), **placed}), lease,
                         [segments[n] for n in used], retired, gradient_out, segments)

    def release(self, placement: Placement) -> None:
        """Give the call's staging segment back for the next call."""
        if placement.lease is not None:
            with self._lock:
                if self._closed:
                    placement.lease.destroy()
                else:
                    self._free.append(placement.lease)

    def forget_registrations(self) -> list[Segment]:
        """Mark every segment unregistered (the server lost them: it restarted)."""
        with self._lock:
            for segment in self._segments.values():
                segment.registered = False
            return list(self._segments.values())

    def close(self) -> list[Segment]:
        """Stop; return the registered segments (to unregister) after removing them all."""
        with self._lock:
            self._closed = True
            segments = list(self._segments.values())
            self._segments.clear()
            self._free.clear()
        if self.link is not None:
            self.link.close()
        for segment in segments:
            segment.destroy()
        return [s for s in segments if s.registered]

    def _new(self, size: int) -> Segment:
        segment = Segment(self.options, size)
        with self._lock:
            self._segments[segment.name] = segment
        return segment

    def _acquire(self, nbytes: int) -> tuple[Segment, list[Segment]]:
        """The smallest idle staging segment that holds ``nbytes``, or a new one (idle
        smaller ones are retired). Called with the lock held."""
        fits = [s for s in self._free if s.size >= nbytes]
        if fits:
            best = min(fits, key=lambda s: s.size)
            self._free.remove(best)
            return best, []
        size = max(_STAGING_MIN_BYTES, 1 << (nbytes - 1).bit_length())
        retired, self._free = self._free, []
        for old in retired:
            del self._segments[old.name]
        segment = Segment(self.options, size)
        self._segments[segment.name] = segment
        return segment, retired

    def _locate(self, data: Any) -> SharedMemoryLocation | None:
        """Where a buffer lies in one of the segments, or None."""
        view = np.frombuffer(data, np.uint8)
        if not view.size or not self._segments:
            return None
        start = view.__array_interface__["data"][0]  # (ndarray.ctypes is slower)
        for segment in self._segments.values():
            if segment.address <= start and start + view.size <= segment.address + segment.size:
                return SharedMemoryLocation(segment.name, start - segment.address, view.size)
        return None
