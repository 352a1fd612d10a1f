"""Shared-memory regions: tensors read in place from, and outputs written into, POSIX
shared memory that a client on the same host (a sidecar's worker) registered by name.

The design follows Triton's system shared-memory extension: a client creates a shared-memory
object (``shm_open``; a file in ``/dev/shm``), registers a byte range of it under a name,
and then sends tensors as (region, offset, byte_size) instead of bytes. Here:

- a key is one file name in the configured directory, with the configured prefix (no
  ``/`` inside, not ``.``/``..``, no symbolic link, a regular file): the server opens
  nothing else;
- each region is mapped once, at registration: read-only for inputs, and read-write as
  well when the object can be opened for writing (outputs need that);
- every location is checked against its region (bounds, the tensor's exact byte count,
  alignment to the item size), outputs must not overlap an input of the same call, and
  the object's size is checked again at each call (a shrunk object would fault);
- calls hold the regions they use; unregistering removes the name at once and unmaps
  the region when the last call using it has finished (or, if an array still views it,
  when that array is freed).

A client that writes into a range while a call reads it gets a result computed from a
mix of old and new values, and one that reads an output range before the call returns
sees a partial gradient; the server itself is unaffected (the mapping stays valid).
Truncating a registered object is the exception: pages past the new end fault, so the
check at each call turns that into FAILED_PRECONDITION, but a truncation during a call
can end the server process (SIGBUS). Shared memory is meant for a trusted worker in the
same pod; it is off unless the server is started with it.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from lossgrad_client._wire import ComputeRequest, SharedMemoryLocation, Tensor

from . import wire
from .errors import (
    DATA_AND_SHARED_MEMORY,
    SHARED_MEMORY_CHANGED,
    SHARED_MEMORY_DISABLED,
    SHARED_MEMORY_INVALID_KEY,
    SHARED_MEMORY_INVALID_NAME,
    SHARED_MEMORY_KEY_NOT_FOUND,
    SHARED_MEMORY_MISALIGNED,
    SHARED_MEMORY_OUT_OF_RANGE,
    SHARED_MEMORY_OVERLAP,
    SHARED_MEMORY_READ_ONLY,
    SHARED_MEMORY_REGION_EXISTS,
    SHARED_MEMORY_REGION_NOT_FOUND,
    TOO_MANY_SHARED_MEMORY_BYTES,
    TOO_MANY_SHARED_MEMORY_REGIONS,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

DEFAULT_DIRECTORY = "/dev/shm"
DEFAULT_KEY_PREFIX = "lossgrad"
DEFAULT_MAX_REGIONS = 64
DEFAULT_MAX_BYTES = 16 * 1024**3
DEFAULT_SOCKET = "lossgrad-{port}.sock"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KEY = re.compile(r"/?([A-Za-z0-9._-]{1,255})")


@dataclass(frozen=True)
class SharedMemoryConfig:
    """Where keys are opened, which names may be opened, and how much may be mapped.

    ``socket`` names the shared-memory socket (:mod:`lossgrad.shm_socket`) in
    ``directory``; ``{port}`` in it becomes the server's port; empty for none.
    """

    directory: str = DEFAULT_DIRECTORY
    key_prefix: str = DEFAULT_KEY_PREFIX
    max_regions: int = DEFAULT_MAX_REGIONS
    max_bytes: int = DEFAULT_MAX_BYTES
    socket: str = DEFAULT_SOCKET

    def __post_init__(self) -> None:
        if self.max_regions < 1 or self.max_bytes < 1:
            raise ValueError("max_regions and max_bytes must be >= 1")
        name = self.socket.replace("{port}", "0")
        if self.socket and (not _NAME.fullmatch(name) or name in (".", "..")):
            raise ValueError(f"socket {self.socket!r}: a file name of [A-Za-z0-9._-] "
                             "(with {port} for the server's port), or empty for none")
        if not _KEY.fullmatch(self.key_prefix or "x") or "/" in self.key_prefix:
            raise ValueError(f"key prefix {self.key_prefix!r}: only [A-Za-z0-9._-] allowed")


def disabled(field: str) -> FailedPreconditionError:
    """The error for any use of shared memory on a server started without it."""
    return FailedPreconditionError(
        field, "shared memory is off on this server (start it with --shared-memory)",
        SHARED_MEMORY_DISABLED)


class Region:
    """One registered region: its mappings and the calls using it."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int,
                 writable: bool, identity: tuple[int, int]) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.writable = writable
        self.identity = identity  # (st_dev, st_ino): two names may map one object
        self._fd = fd
        # Mappings start on a page; ``_start`` is where the region begins in them.
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._start = offset - base
        length = self._start + byte_size
        self._read: mmap.mmap | None = mmap.mmap(fd, length, access=mmap.ACCESS_READ,
                                                 offset=base)
        self._write: mmap.mmap | None = None
        if writable:
            self._write = mmap.mmap(fd, length, access=mmap.ACCESS_WRITE, offset=base)
        self.users = 0
        self.unregistered = False

    def check_size(self, field: str) -> None:
        """FAILED_PRECONDITION if the object shrank below the region since registration."""
        size = os.fstat(self._fd).st_size
        if size < self.offset + self.byte_size:
            raise FailedPreconditionError(
                field, f"shared-memory object {self.key!r} shrank to {size} bytes; region "
                f"{self.name!r} needs {self.offset + self.byte_size} (register it again)",
                SHARED_MEMORY_CHANGED)

    def array(self, offset: int, count: int, dtype: np.dtype, writable: bool) -> np.ndarray:
        """``count`` items of ``dtype`` at ``offset`` bytes into the region (no copy)."""
        mapping = self._write if writable else self._read
        assert mapping is not None
        return np.frombuffer(mapping, dtype=dtype, count=count, offset=self._start + offset)

    def close(self) -> None:
        """Unmap now, or (an array still views it) once that array is freed."""
        for mapping in (self._read, self._write):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass  # the last view's release unmaps it
        self._read = self._write = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SharedMemoryRegistry:
    """The registered regions of one server; thread-safe."""

    def __init__(self, config: SharedMemoryConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}
        self._bytes = 0
        self._closed = False

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``."""
        if not _NAME.fullmatch(name):
            raise InvalidArgumentError(
                "name", f"{name!r}: 1 to 128 characters of [A-Za-z0-9._-]",
                SHARED_MEMORY_INVALID_NAME)
        file_name = self._file_name(key)
        if offset < 0:
            raise InvalidArgumentError("offset", f"{offset} is negative",
                                       SHARED_MEMORY_OUT_OF_RANGE)
        if byte_size <= 0:
            raise InvalidArgumentError("byte_size", f"{byte_size}: must be > 0",
                                       SHARED_MEMORY_OUT_OF_RANGE)
        fd, writable = self._open(file_name, key)
        kept = False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError("key", f"{key!r} is not a shared-memory object",
                                           SHARED_MEMORY_INVALID_KEY)
            if offset + byte_size > info.st_size:
                raise InvalidArgumentError(
                    "byte_size", f"offset {offset} + byte_size {byte_size} is past the end "
                    f"of {key!r} ({info.st_size} bytes)", SHARED_MEMORY_OUT_OF_RANGE)
            identity = (info.st_dev, info.st_ino)
            with self._lock:
                existing = self._regions.get(name)
                if existing is not None:
                    if (existing.key, existing.offset, existing.byte_size,
                            existing.identity) == (key, offset, byte_size, identity):
                        return  # idempotent
                    raise AlreadyExistsError(
                        "name", f"region {name!r} is registered with another key, range or "
                        "object; unregister it first", SHARED_MEMORY_REGION_EXISTS)
                self._check_limits(byte_size)
                self._regions[name] = Region(name, key, offset, byte_size, fd, writable,
                                             identity)
                self._bytes += byte_size
                kept = True
        finally:
            if not kept:
                os.close(fd)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (every region when empty); unknown names are not an error."""
        with self._lock:
            names = list(self._regions) if not name else [name]
            for gone in [self._regions.pop(n) for n in names if n in self._regions]:
                self._bytes -= gone.byte_size
                gone.unregistered = True
                if gone.users == 0:
                    gone.close()

    def status(self, name: str) -> list[Region]:
        """The regions (or the one called ``name``; NOT_FOUND if none is), by name."""
        with self._lock:
            if name and name not in self._regions:
                raise _not_found("name", name)
            return [r for n, r in sorted(self._regions.items()) if not name or n == name]

    def close(self) -> None:
        """Unregister every region and refuse new ones (server shutdown)."""
        self.unregister("")
        with self._lock:
            self._closed = True

    @contextmanager
    def call(self) -> Iterator[CallScope]:
        """The regions one call uses: held from first use until the call ends."""
        scope = CallScope(self)
        try:
            yield scope
        finally:
            with self._lock:
                for region in scope.held.values():
                    region.users -= 1
                    if region.users == 0 and region.unregistered:
                        region.close()

    def acquire(self, name: str, field: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise _not_found(field, name)
            region.users += 1
            return region

    def _file_name(self, key: str) -> str:
        match = _KEY.fullmatch(key)
        file_name = match.group(1) if match else ""
        if not match or file_name in (".", "..") or not file_name.startswith(
                self.config.key_prefix):
            raise InvalidArgumentError(
                "key", f"{key!r}: expected an optional '/' and up to 255 characters of "
                f"[A-Za-z0-9._-] starting with {self.config.key_prefix!r}",
                SHARED_MEMORY_INVALID_KEY)
        return file_name

    def _open(self, file_name: str, key: str) -> tuple[int, bool]:
        """Open the object for reading and writing, or for reading only where not allowed."""
        path = os.path.join(self.config.directory, file_name)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        try:
            try:
                return os.open(path, os.O_RDWR | flags), True
            except PermissionError:
                return os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:
            raise NotFoundError("key", f"no shared-memory object {key!r} in "
                                f"{self.config.directory}", SHARED_MEMORY_KEY_NOT_FOUND) from None
        except OSError as err:  # ELOOP: a symbolic link; EACCES; ...
            raise InvalidArgumentError("key", f"cannot open {key!r}: {err.strerror}",
                                       SHARED_MEMORY_INVALID_KEY) from None

    def _check_limits(self, byte_size: int) -> None:
        if self._closed:
            raise FailedPreconditionError("", "the server is shutting down",
                                          SHARED_MEMORY_DISABLED)
        if len(self._regions) >= self.config.max_regions:
            raise ResourceExhaustedError(
                "name", f"{len(self._regions)} regions are registered; the limit is "
                f"{self.config.max_regions} (--shared-memory-max-regions)",
                TOO_MANY_SHARED_MEMORY_REGIONS)
        if self._bytes + byte_size > self.config.max_bytes:
            raise ResourceExhaustedError(
                "byte_size", f"{self._bytes} bytes are registered; {byte_size} more would "
                f"pass the limit of {self.config.max_bytes} (--shared-memory-max-bytes)",
                TOO_MANY_SHARED_MEMORY_BYTES)


def _not_found(field: str, name: str) -> NotFoundError:
    return NotFoundError(field, f"no shared-memory region {name!r} is registered",
                         SHARED_MEMORY_REGION_NOT_FOUND)


class CallScope:
    """Resolves one call's locations: inputs as read-only arrays, outputs as writable
    byte buffers; remembers the byte ranges used so that an output cannot overlap."""

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self._registry = registry
        self.held: dict[str, Region] = {}
        self._inputs: list[tuple[tuple[int, int], int, int, str]] = []

    def decode(self, tensor: Tensor, field: str) -> np.ndarray:
        """A request tensor as a read-only array: in place in its region, or from its bytes."""
        location = tensor.shared_memory
        if location is None:
            return wire.decode_tensor(tensor, field)
        if memoryview(tensor.data).nbytes:
            raise InvalidArgumentError(
                f"{field}.data", "set together with shared_memory; send one of them",
                DATA_AND_SHARED_MEMORY)
        where = f"{field}.shared_memory"
        dtype = wire.tensor_layout(tensor, field, location.byte_size, f"{where}.byte_size")
        region, start = self._range(location, where, dtype.itemsize)
        self._inputs.append((region.identity, start, start + location.byte_size, field))
        array = region.array(location.offset, location.byte_size // dtype.itemsize, dtype,
                             writable=False)
        return array.reshape(tensor.shape)

    def output(self, location: SharedMemoryLocation, field: str, itemsize: int) -> np.ndarray:
        """A writable byte buffer over an output location, which no input overlaps."""
        region, start = self._range(location, field, itemsize)
        if not region.writable:
            raise FailedPreconditionError(
                f"{field}.region", f"region {region.name!r} is read-only for the server "
                f"(it cannot open {region.key!r} for writing)", SHARED_MEMORY_READ_ONLY)
        end = start + location.byte_size
        for identity, low, high, name in self._inputs:
            if identity == region.identity and start < high and low < end:
                raise InvalidArgumentError(
                    field, f"overlaps {name} in the same shared-memory object",
                    SHARED_MEMORY_OVERLAP)
        self._inputs.append((region.identity, start, end, field))
        return region.array(location.offset, location.byte_size, np.dtype(np.uint8),
                            writable=True)

    def _range(self, location: SharedMemoryLocation, field: str,
               itemsize: int) -> tuple[Region, int]:
        """The region of a location (held for the call) and where the range starts in its
        object; INVALID_ARGUMENT unless the range lies inside the region, aligned."""
        region = self.held.get(location.region)
        if region is None:
            region = self._registry.acquire(location.region, f"{field}.region")
            self.held[location.region] = region
            region.check_size(f"{field}.region")
        offset, size = location.offset, location.byte_size
        if offset < 0 or offset > region.byte_size:
            raise InvalidArgumentError(
                f"{field}.offset", f"{offset} is outside region {region.name!r} "
                f"({region.byte_size} bytes)", SHARED_MEMORY_OUT_OF_RANGE)
        if size < 0 or offset + size > region.byte_size:
            raise InvalidArgumentError(
                f"{field}.byte_size", f"{size} bytes at offset {offset} pass the end of "
                f"region {region.name!r} ({region.byte_size} bytes)",
                SHARED_MEMORY_OUT_OF_RANGE)
        start = region.offset + offset  # in the object; mappings start on a page
        if start % itemsize:
            raise InvalidArgumentError(
                f"{field}.offset", f"byte {start} of the object is not a multiple of the "
                f"item size {itemsize}", SHARED_MEMORY_MISALIGNED)
        return region, start


def first_use(request: ComputeRequest, gradient: bool) -> str | None:
    """The first field of a request that refers to shared memory, or None."""
    for name in ("predictions", "targets", "sample_weight"):
        tensor = getattr(request, name)
        if tensor is not None and tensor.shared_memory is not None:
            return f"{name}.shared_memory"
    if gradient and request.gradient_output is not None:
        return "gradient_output"
    return "losses_output" if request.losses_output is not None else None
