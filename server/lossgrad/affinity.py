"""``--io-cpu``: keep the threads that carry calls on one CPU.

A call passes through several threads of the server: gRPC's I/O threads read it, the
Python poller hands it to a worker of the pool, the worker runs the handler, and gRPC
sends the answer. When those threads sit on different CPUs, a hand-over may have to wake
another CPU (an idle vCPU of a VM halts, and waking it is slow), and it runs on caches
that another process has used since: measured here (2 vCPUs, the client on the same host), a
1e3-element MSE call took 0.92 ms at p50 with the threads free and 0.64 ms with them on
one CPU. numba's kernel threads are left on every CPU the process may use, so a large
kernel still runs on all of them (its calling thread, a pool worker, is one of the
pinned threads).

The threads to pin are those of Python (``threading.enumerate``) and those that gRPC's
core names (every thread whose name differs from the main thread's); numba's thread pool
neither runs Python nor names its threads. Threads started later inherit the pin of the
thread that starts them, so the pool is started first (a kernel above the parallel
threshold), while every thread still runs anywhere.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from . import engine
from .kernels import _numerics as nm

AUTO = "auto"
OFF = "off"


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on; ValueError where the system cannot pin threads
    (only Linux can, here)."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        raise ValueError("pinning threads to a CPU needs Linux")
    return set(os.sched_getaffinity(0))


def parse_cpu(text: str) -> int | None:
    """``--io-cpu``'s value: a CPU this process may run on, ``auto`` (the highest such
    CPU) or ``off`` (None). Raises ValueError naming the allowed CPUs."""
    value = text.strip().lower()
    if value in (OFF, ""):
        return None
    if value == AUTO:
        return max(allowed_cpus())
    try:
        cpu = int(value)
    except ValueError:
        raise ValueError(f"must be a CPU number, {AUTO!r} or {OFF!r}, got {text!r}") from None
    return check_cpu(cpu)


def check_cpu(cpu: int) -> int:
    """``cpu``, if this process may run on it; else ValueError naming the CPUs it may."""
    cpus = allowed_cpus()
    if cpu not in cpus:
        raise ValueError(f"CPU {cpu} is not one this process may run on ({cpu_list(cpus)})")
    return cpu


def pin_call_threads(cpu: int) -> int:
    """Pin this process's Python and gRPC threads to ``cpu`` (numba's pool, started here
    if it is not yet, keeps its CPUs); returns how many threads were pinned."""
    check_cpu(cpu)
    _start_kernel_pool()
    main_name = _thread_name(threading.main_thread().native_id)
    python = {thread.native_id for thread in threading.enumerate()
              if thread.native_id is not None}
    pinned = 0
    for tid in _thread_ids():
        if tid in python or _thread_name(tid) not in (main_name, None):
            try:
                os.sched_setaffinity(tid, {cpu})
            except (ProcessLookupError, PermissionError):  # ended meanwhile, or not movable
                continue
            pinned += 1
    return pinned


def _start_kernel_pool() -> None:
    """Run a kernel on the parallel path, so that numba starts its thread pool from this
    (unpinned) thread; a few times, for a pool that starts its threads as work comes."""
    x = np.zeros(4 * nm.PARALLEL_MIN, np.float32)
    for _ in range(3):
        engine.compute("mse", x, x)


def _thread_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/task")]


def _thread_name(tid: int | None) -> str | None:
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as comm:
            return comm.read().rstrip("\n")
    except OSError:  # ended meanwhile
        return None


def cpu_list(cpus: set[int]) -> str:
    """``CPUs 0,1``: the set, for messages."""
    return "CPUs " + ",".join(str(cpu) for cpu in sorted(cpus))
