"""glibc malloc tuning for processes that move tensors of many megabytes.

glibc returns a freed block above its mmap threshold (at most 32 MiB by default) to the
kernel, and trims the top of its heap, so the next tensor of that size pays a page fault
per 4 KiB page again. The server tunes itself at start; a worker that sends or receives
large tensors can call :func:`tune_allocator` once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
KEEP_FREED_BYTES = 1 << 30


def tune_allocator(*, arenas: int | None = None) -> bool:
    """Make glibc malloc keep freed large blocks (up to 1 GiB) for reuse instead of
    returning them to the kernel; with ``arenas``, also cap its arenas (threads started
    after the call share them).

    The environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (and
    MALLOC_ARENA_MAX for the arenas) take precedence: what they set is left alone.
    Returns False where there is no glibc ``mallopt`` or it refused a setting.
    """
    if arenas is not None and arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    tuned = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        tuned = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                     and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    if arenas is not None and "MALLOC_ARENA_MAX" not in os.environ:
        tuned = bool(mallopt(_M_ARENA_MAX, arenas)) and tuned
    return tuned
