"""Timing helpers: bounded repetitions, medians and tail percentiles, the machine's facts.

Every loop here is bounded twice: by a repetition count and by a time budget.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds."""

    samples: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.samples)

    def ms(self, q: float = 50.0) -> float:
        """The q-th percentile in milliseconds (50: the median)."""
        return float(np.percentile(self.samples, q)) * 1e3


def repeat(fn: Callable[[], object], *, budget_s: float, min_reps: int, max_reps: int,
           warm: int = 1) -> Timing:
    """Call ``fn`` ``warm`` times untimed, then time it at least ``min_reps`` and at most
    ``max_reps`` times, stopping once ``budget_s`` seconds of timed calls have passed."""
    for _ in range(warm):
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return Timing(tuple(samples))


TURN_WARM_S = 0.015  # untimed calls that start each turn: > the ~10 ms below


def interleaved(fns: dict[str, Callable[[], object]], *, budget_s: float, min_reps: int,
                max_reps: int, rounds: int = 5) -> dict[str, Timing]:
    """Like ``repeat`` for several functions at once, taking turns: each round gives each
    function about ``budget_s / rounds`` seconds and at most ``max_reps / rounds`` calls
    (at least one), so a burst of load from other processes hits every function alike
    rather than the one being timed. Each turn starts with ``TURN_WARM_S`` of untimed
    calls (at least one), so that no function is timed in the ~10 ms after the one before
    it, which can still hold the cores (libgomp's threads, which PyTorch uses, spin that
    long after each parallel call here), nor before its own threads are awake again."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    per_turn = max(1, -(-max_reps // rounds))

    def done(name: str) -> bool:
        n = len(samples[name])
        return n >= max_reps or (n >= min_reps and spent[name] >= budget_s)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            if done(name):
                continue
            warm_until = time.perf_counter() + TURN_WARM_S
            fn()
            while time.perf_counter() < warm_until:
                fn()
            this_round = 0.0
            calls = 0
            while not done(name) and calls < per_turn and (
                    calls == 0 or this_round < budget_s / rounds):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                samples[name].append(elapsed)
                spent[name] += elapsed
                this_round += elapsed
                calls += 1
    return {name: Timing(tuple(v)) for name, v in samples.items()}


def fmt_ms(value: float) -> str:
    size = abs(value)
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, str]:
    """CPU model, cores, memory and load, as plain strings."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "memory": mem,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def versions() -> dict[str, str]:
    import grpc
    import llvmlite
    import lossgrad
    import numba
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "lossgrad": f"{lossgrad.__version__} ({git_revision()})",
    }


def git_revision() -> str:
    """The commit this tree is at, and whether it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10,
                               check=True)
    except (OSError, subprocess.SubprocessError):
        return "git revision unknown"
    suffix = " plus uncommitted changes" if dirty.stdout.strip() else ""
    return f"git {head.stdout.strip()}{suffix}"


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, from /proc/stat; CPU seconds this process
    and its waited-for children have used). Their growth apart is other processes' load."""
    busy = float("nan")
    stat = Path("/proc/stat")
    if stat.exists():
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1) -> float:
    """Wait until other processes use less than ``threshold`` of one core over a window
    (a third of ``max_wait_s``, within [0.2, 1] s), at most about ``max_wait_s`` seconds;
    return the seconds waited."""
    window_s = min(1.0, max(0.2, max_wait_s / 3))
    start = time.monotonic()
    while True:
        busy0, own0 = cpu_seconds()
        time.sleep(window_s)
        busy1, own1 = cpu_seconds()
        other = (busy1 - busy0) - (own1 - own0)
        waited = time.monotonic() - start
        if not other == other or other < threshold * window_s or waited >= max_wait_s:
            return waited


def source_digest() -> str:
    """A short hash of lossgrad's server and client sources: if it changes during a run,
    the tables mix two versions of the code."""
    digest = hashlib.sha256()
    for root in ("server", "client"):
        for path in sorted((REPO / root).rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


T = TypeVar("T")
# ``calmly`` measures again only before this ``time.monotonic()`` deadline, so that a busy
# machine cannot stretch a run without bound; ``bench/run.py`` sets it.
retry_deadline = float("inf")


def calmly(run: Callable[[], T], *, max_wait_s: float, attempts: int,
           max_other: float = 0.25) -> tuple[T, float]:
    """Call ``run`` after waiting (at most ``max_wait_s``) for other processes to idle, and
    again, up to ``attempts`` calls in all, while they used more than ``max_other`` of one
    core meanwhile. Returns the calmest call's result and that share of a core."""
    best: tuple[T, float] | None = None
    for _ in range(attempts):
        wait_for_quiet(max_wait_s)
        busy0, own0 = cpu_seconds()
        start = time.monotonic()
        result = run()
        elapsed = max(time.monotonic() - start, 1e-9)
        busy1, own1 = cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed
        if best is None or other < best[1]:
            best = (result, other)
        if other <= max_other or time.monotonic() > retry_deadline:
            break
    assert best is not None
    return best
