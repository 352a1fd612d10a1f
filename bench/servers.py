"""Server subprocesses on 127.0.0.1: the lossgrad service and the bare echo server.

A ``ServerProcess`` starts the command, waits (bounded) for its ready line
``... serving on HOST:PORT``, and always terminates the process on exit.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
READY_TIMEOUT_S = 180.0  # a cold numba cache compiles every kernel first
STOP_TIMEOUT_S = 10.0
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}


def max_workers() -> int:
    from lossgrad.server import DEFAULT_MAX_WORKERS

    return DEFAULT_MAX_WORKERS


# ``lossgrad serve`` with the server's own allocator tuning switched off, to measure what
# glibc's defaults cost.
_UNTUNED = ("import sys, lossgrad.server as s; s.tune_allocator = lambda: False; "
            "from lossgrad.cli import main; sys.exit(main(sys.argv[1:]))")


def server_tunes_allocator() -> bool:
    """Whether ``lossgrad serve`` tunes glibc malloc itself (``server.tune_allocator``)."""
    import lossgrad.server

    return hasattr(lossgrad.server, "tune_allocator")


def lossgrad_command(workers: int, untuned: bool = False, io_cpu: bool = False) -> list[str]:
    """``lossgrad serve`` on a free port; ``untuned`` disables its own malloc tuning,
    ``io_cpu`` pins its call threads (``--io-cpu auto``: the highest CPU, ``io_cpu()``)."""
    launch = ["-c", _UNTUNED] if untuned and server_tunes_allocator() else ["-m", "lossgrad"]
    return [sys.executable, *launch, "serve", "--host", HOST, "--port", "0",
            "--max-workers", str(workers), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
            *(["--io-cpu", "auto"] if io_cpu else [])]


def echo_command(workers: int, io_cpu: bool = False) -> list[str]:
    """The echo server; ``io_cpu`` runs it on the CPU that ``--io-cpu auto`` picks."""
    return [sys.executable, str(HERE / "echo_server.py"), "--host", HOST, "--port", "0",
            "--max-workers", str(workers), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
            *(["--cpu", str(io_cpu_auto())] if io_cpu else [])]


def io_cpu_auto() -> int:
    """The CPU ``lossgrad serve --io-cpu auto`` pins its call threads to."""
    from lossgrad.affinity import AUTO, parse_cpu

    cpu = parse_cpu(AUTO)
    assert cpu is not None
    return cpu


class ServerProcess:
    """``with ServerProcess(cmd) as server:`` gives ``server.address`` and ``server.pid``."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self._command = command
        self._env = env
        self._log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen[str] | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(self._command, stdout=subprocess.PIPE, stderr=self._log,
                                      env=self._env, text=True)
        try:
            threading.Thread(target=self._drain, daemon=True).start()
            self.address = self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if " serving on " in line:
                return line.rsplit(" serving on ", 1)[1].strip()
        raise RuntimeError(f"server did not become ready: {self._command}\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def status(self, key: str) -> int:
        """A ``/proc/PID/status`` memory field (``VmHWM``, ``VmRSS``) in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
        finally:
            self._log.close()
            self._proc = None


def child_env(malloc_tuned: bool) -> dict[str, str]:
    """This process's environment with the glibc malloc variables removed, or set."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if malloc_tuned:
        env.update(MALLOC_ENV)
    return env
