"""The ``lossgrad`` command line: the catalog table, and ``serve`` in a real subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from lossgrad import LOSSES
from lossgrad.cli import main
from lossgrad.server import create_server
from lossgrad_client import InvalidArgumentError, LossClient, ResourceExhaustedError
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

# The first start may compile every kernel (numba caches them for later starts).
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
READY_LINE = re.compile(r"^lossgrad serving on (\S+):(\d+)$")


def test_losses_lists_every_loss(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ALIASES", "PREDICTIONS", "TARGETS", "HESSIAN",
                                "PARAMS"]
    rmse = next(line for line in lines if line.startswith("rmse "))
    assert rmse.split()[-2:] == ["exact", "-"]  # the Hessian modes, then the params
    assert "exact/clipped/constant" in next(line for line in lines if line.startswith("mse "))
    first_words = [line.split()[0] for line in lines[1:] if line and not line[0].isspace()]
    assert first_words == [spec.name for spec in LOSSES]
    for alias in ("l1", "l2", "sigmoid_cross_entropy"):
        assert alias in out
    assert "delta=1.0 in (0, inf)" in out
    assert "label_smoothing=0.0 in [0, 1)" in out
    assert "ignore_index=unset" in out
    assert "class_indices (int32/int64)" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: lossgrad" in capsys.readouterr().err


def test_bad_environment_value_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOSSGRAD_PORT", "not-a-port")
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "flag"), [("LOSSGRAD_LOG_FORMAT", "--log-format"),
                                            ("LOSSGRAD_ACCESS_LOG", "--access-log")])
def test_bad_environment_choice_is_a_usage_error(
    name: str, flag: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert f"{flag}: must be one of" in capsys.readouterr().err


# --- serve in a subprocess -------------------------------------------------------------------

class Served:
    """A ``lossgrad serve`` subprocess and the address from its ready line."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int) -> None:
        self.proc = proc
        self.address = f"{host}:{port}"
        self.port = port


def _readline(stream: IO[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no ready line within {timeout:.0f} s")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start ``python -m lossgrad serve ARGS`` with extra environment; stop it at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> Served:
        log_path = tmp_path / f"stderr-{len(procs)}.log"
        with open(log_path, "w") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "lossgrad", "serve", *args],
                stdout=subprocess.PIPE, stderr=stderr, text=True,
                env={**os.environ, **(env or {})},
            )
        procs.append(proc)
        assert proc.stdout is not None
        line = _readline(proc.stdout, READY_TIMEOUT_S).rstrip("\n")
        match = READY_LINE.match(line)
        assert match, f"unexpected first line {line!r}; stderr:\n{log_path.read_text()}"
        return Served(proc, match.group(1), int(match.group(2)))

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(STOP_TIMEOUT_S)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serve_answers_and_stops_on_signal(
    start: Callable[..., Served], sig: signal.Signals
) -> None:
    served = start("--host", "127.0.0.1", "--port", "0", "--max-workers", "2")
    assert served.port > 0
    with LossClient(served.address, timeout=60) as client:
        result = client.compute_gradient("huber", [0.0, 3.0], [0.0, 0.0], delta=1.0,
                                         reduction="sum")
        assert result.loss == 2.5
        assert result.gradient.tolist() == [0.0, 1.0]
    served.proc.send_signal(sig)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0


@pytest.mark.e2e
def test_serve_reads_its_options_from_the_environment(start: Callable[..., Served]) -> None:
    served = start(env={
        "LOSSGRAD_HOST": "127.0.0.1", "LOSSGRAD_PORT": "0", "LOSSGRAD_MAX_WORKERS": "1",
        "LOSSGRAD_MAX_MESSAGE_BYTES": "65536",
    })
    with LossClient(served.address, timeout=60) as client:
        assert len(client.list_losses()) == len(LOSSES)
        with pytest.raises(ResourceExhaustedError):  # LOSSGRAD_MAX_MESSAGE_BYTES=65536
            client.compute_loss("mse", [0.0] * 10_000, [0.0] * 10_000)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0


@pytest.mark.e2e
def test_serve_takes_the_stream_limits(start: Callable[..., Served]) -> None:
    """--max-stream-chunks on the command line, LOSSGRAD_MAX_STREAM_ELEMENTS from the
    environment: both in GetServerInfo, and both enforced on a ComputeStream call."""
    served = start("--port", "0", "--max-stream-chunks", "3",
                   env={"LOSSGRAD_MAX_STREAM_ELEMENTS": "1000"})
    with grpc.insecure_channel(served.address) as channel:
        limits = pb_grpc.LossServiceStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=60).limits
    assert (limits.max_stream_elements, limits.max_stream_chunks) == (1000, 3)
    with LossClient(served.address, timeout=60, stream_chunk_bytes=80) as client:
        with pytest.raises(ResourceExhaustedError) as too_big:  # 2 x 501 elements
            client.compute_loss("mse", [0.0] * 501, [0.0] * 501, stream=True)
        with pytest.raises(InvalidArgumentError) as too_many:  # 5 float64 rows a chunk
            client.compute_loss("mse", [0.0] * 40, [0.0] * 40, stream=True)
        assert client.compute_loss("mse", [1.0] * 15, [0.0] * 15, stream=True).loss == 1.0
    assert too_big.value.reason == "TOO_MANY_ELEMENTS"
    assert (too_many.value.reason, too_many.value.field) == ("TOO_MANY_CHUNKS", "chunk[3]")
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0


@pytest.mark.e2e
@pytest.mark.parametrize(("access_log", "logged"), [(None, ["INVALID_ARGUMENT"]),
                                                    ("all", ["OK", "INVALID_ARGUMENT"]),
                                                    ("off", [])])
def test_access_log_choice(access_log: str | None, logged: list[str],
                           start: Callable[..., Served], tmp_path: Path) -> None:
    """By default only failed calls get an access line; `all` logs every call."""
    env = {} if access_log is None else {"LOSSGRAD_ACCESS_LOG": access_log}
    served = start("--log-format", "json", env=env)
    with LossClient(served.address, timeout=60) as client:
        client.compute_loss("mse", [1.0], [1.0])
        with pytest.raises(InvalidArgumentError):
            client.compute_loss("mse", [1.0], [1.0, 2.0])
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0
    lines = [json.loads(line) for line in (tmp_path / "stderr-0.log").read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "lossgrad.access"]
    assert [line["code"] for line in access] == logged
    assert all(line["level"] == "WARNING" for line in access if line["code"] != "OK")


@pytest.mark.e2e
def test_serve_on_a_taken_port_exits_with_an_error(server_address: str) -> None:
    """A second server on a port in use must fail, not share the port (SO_REUSEPORT off)."""
    host, port = server_address.rsplit(":", 1)
    done = subprocess.run(
        [sys.executable, "-m", "lossgrad", "serve", "--host", host, "--port", port],
        capture_output=True, text=True, timeout=READY_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert "serving on" not in done.stdout
    assert f"cannot bind {host}:{port}" in done.stderr


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_port_outside_the_range_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", port])
    assert info.value.code == 2
    assert "must be in [0, 65535]" in capsys.readouterr().err


def test_create_server_rejects_a_port_outside_the_range() -> None:
    with pytest.raises(ValueError, match="port"):
        create_server("127.0.0.1", 99999, warm=False)


def test_compile_fills_the_cache(tmp_path: Path) -> None:
    """`lossgrad compile` writes the kernels into NUMBA_CACHE_DIR, where a server finds them."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "lossgrad", "compile"], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    assert str(tmp_path) in done.stdout
    assert list(tmp_path.rglob("*.nbi")), "no numba cache index written"


# --- --io-cpu ------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_io_cpu_pins_the_call_threads_and_leaves_the_kernel_pool_free(
    start: Callable[..., Served],
) -> None:
    cpus = os.sched_getaffinity(0)
    served = start("--port", "0", env={"LOSSGRAD_IO_CPU": "auto"})
    pid = served.proc.pid
    with LossClient(served.address, timeout=60) as client:  # a kernel on the parallel path
        result = client.compute_gradient("mse", [1.0] * 200_000, [0.0] * 200_000)
        assert result.loss == 1.0
        assert set(result.gradient.tolist()) == {1e-05}
    threads = {tid: (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip(),
                     os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}
    assert threads[str(pid)][1] == {max(cpus)}  # the main thread
    grpc_threads = [allowed for name, allowed in threads.values() if name == "event_engine"]
    assert grpc_threads and all(allowed == {max(cpus)} for allowed in grpc_threads)
    free = [tid for tid, (_, allowed) in threads.items() if allowed == cpus]
    assert len(free) >= 1  # numba's pool (and numpy's BLAS threads)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0


@pytest.mark.parametrize(("value", "message"), [
    ("4096", "CPU 4096 is not one this process may run on"),
    ("-1", "CPU -1 is not one this process may run on"),
    ("first", "must be a CPU number, 'auto' or 'off'"),
])
def test_an_io_cpu_this_process_cannot_use_is_a_usage_error(
    value: str, message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--io-cpu", value])
    assert info.value.code == 2
    assert f"--io-cpu: {message}" in capsys.readouterr().err


def test_io_cpu_values() -> None:
    from lossgrad.affinity import parse_cpu

    cpus = os.sched_getaffinity(0)
    assert parse_cpu("off") is None
    assert parse_cpu("AUTO") == max(cpus)
    assert parse_cpu(str(min(cpus))) == min(cpus)
    with pytest.raises(ValueError, match="CPU 4096 is not one this process may run on"):
        create_server("127.0.0.1", 0, warm=False, io_cpu=4096)
