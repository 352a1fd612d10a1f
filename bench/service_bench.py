"""Sections 3-5: the service end to end, concurrent requests, and server peak memory.

Runs as a child of ``bench/run.py`` so that the client process (this one) and the
servers it starts share one environment, e.g. the glibc malloc variables:

    python bench/service_bench.py --section e2e [--quick] --out RESULT.json

writes ``{"markdown": ..., "problems": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import lossgrad
import numpy as np
from cases import Case, inputs, mse, request_bytes, sparse_ce
from echo_server import METHOD as ECHO_METHOD
from lossgrad_client import LossClient
from lossgrad_client._stream import DEFAULT_STREAM_THRESHOLD_BYTES
from measure import Timing, fmt_ms, fmt_ratio, process_cpu_seconds, repeat, table
from servers import MAX_MESSAGE_BYTES, ServerProcess, echo_command, lossgrad_command, max_workers

CALL_TIMEOUT_S = 120.0
SEQUENTIAL_CALLS = 3  # memory burst: calls one after the other,
CONCURRENT_ROUNDS = 1  # then rounds of two at once
MB = 1e6


def _client(address: str) -> LossClient:
    # A channel of its own (own TCP connection), not one shared through the global pool.
    return LossClient(address, timeout=CALL_TIMEOUT_S,
                      options=[("grpc.use_local_subchannel_pool", 1)])


def _call(client: LossClient, case: Case, x: np.ndarray, y: np.ndarray,
          stream: bool | None = None) -> Any:
    return client.compute_gradient(case.loss, x, y, stream=stream, **case.params)


def _same_as_in_process(result: Any, case: Case, x: np.ndarray, y: np.ndarray) -> bool:
    local = lossgrad.compute(case.loss, x, y, **case.params)
    assert local.gradient is not None
    return bool(float(result.loss) == float(local.loss)
                and result.gradient.tobytes() == local.gradient.tobytes())


# --- section 3: end to end against an echo ---------------------------------------------

def e2e(quick: bool, untuned: bool, io_cpu: bool = False) -> tuple[str, list[str]]:
    sizes = [10**3, 10**5, 10**6] + ([] if quick else [16_000_000])
    cases = [mse(n) for n in sizes] + [sparse_ce(256, 10)]
    per_method_s = 1.0 if quick else 3.0
    max_calls = 300 if quick else 2000
    workers = max_workers()
    rows, problems = [], []
    with ServerProcess(lossgrad_command(workers, untuned, io_cpu)) as lg_server, \
            ServerProcess(echo_command(workers, io_cpu)) as echo_server, \
            _client(lg_server.address) as client:
        channel = grpc.insecure_channel(echo_server.address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        try:
            echo = channel.unary_unary(ECHO_METHOD)  # no serializers: bytes in, bytes out
            for case in cases:
                x, y = inputs(case)
                label = f"{case.family} {case.size_label}"
                payload = x.tobytes() + y.tobytes()
                same = _same_as_in_process(_call(client, case, x, y), case, x, y)
                if not same:
                    problems.append(f"e2e {label}: result differs from in-process")
                if echo(payload, timeout=CALL_TIMEOUT_S) != payload:
                    raise RuntimeError("echo server changed the payload")
                local = repeat(lambda c=case, a=x, b=y: lossgrad.compute(c.loss, a, b,
                                                                         **c.params),
                               budget_s=per_method_s / 4, min_reps=3, max_reps=max_calls)
                lg = repeat(lambda c=case, a=x, b=y: _call(client, c, a, b),
                            budget_s=per_method_s, min_reps=5, max_reps=max_calls, warm=1)
                ec = repeat(lambda p=payload: echo(p, timeout=CALL_TIMEOUT_S),
                            budget_s=per_method_s, min_reps=5, max_reps=max_calls, warm=1)
                print(f"  e2e {label}: lossgrad {lg.ms():.3f} ms, "
                      f"echo {ec.ms():.3f} ms", flush=True)
                rows.append([
                    label, f"{len(payload) / MB:.3g}", f"{x.nbytes / MB:.3g}",
                    fmt_ms(local.ms()),
                    f"{fmt_ms(lg.ms(50))} / {fmt_ms(lg.ms(99))}",
                    f"{fmt_ms(ec.ms(50))} / {fmt_ms(ec.ms(99))}",
                    fmt_ratio(lg.ms() / ec.ms()), fmt_ms(lg.ms() - ec.ms() - local.ms()),
                    f"{lg.n} / {ec.n}", "yes" if same else "**NO**",
                ])
        finally:
            channel.close()
    header = ["loss and size (float32)", "request MB", "gradient MB", "in-process compute ms",
              "lossgrad p50 / p99 ms", "echo p50 / p99 ms", "lossgrad / echo (p50)",
              "lossgrad − echo − compute ms", "calls (lossgrad / echo)",
              "same bits as in-process"]
    return table(header, rows), problems


# --- section 4: two large requests at once ---------------------------------------------

def _together(calls: list[Callable[[], object]]) -> float:
    """Run ``calls`` on one thread each, released together; the wall time until all return."""
    barrier = threading.Barrier(len(calls) + 1)
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=CALL_TIMEOUT_S)
            fn()
        except BaseException as err:  # re-raised below, never swallowed
            errors.append(err)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in calls]
    for t in threads:
        t.start()
    barrier.wait(timeout=CALL_TIMEOUT_S)
    start = time.perf_counter()
    for t in threads:
        t.join(CALL_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


class _Worker:
    """A training worker of its own: a spawned child process with its own client and
    inputs, which makes one ``compute_gradient`` per :meth:`call`. Two of them call the
    server as two workers on one host do, without sharing a GIL."""

    def __init__(self, address: str, case: Case) -> None:
        context = multiprocessing.get_context("spawn")
        self._go: Any = context.Queue()
        self._done: Any = context.Queue()
        self._process = context.Process(target=_worker_main, daemon=True,
                                        args=(address, case, self._go, self._done))

    def __enter__(self) -> _Worker:
        self._process.start()
        self._wait()  # its inputs are built and its first call is made
        return self

    def __exit__(self, *exc: object) -> None:
        self._go.put(None)
        self._process.join(CALL_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def call(self) -> None:
        self._go.put(True)
        self._wait()

    def _wait(self) -> None:
        error = self._done.get(timeout=CALL_TIMEOUT_S)
        if error:
            raise RuntimeError(f"worker process failed: {error}")


def _worker_main(address: str, case: Case, go: Any, done: Any) -> None:
    try:
        x, y = inputs(case)
        with _client(address) as client:
            _call(client, case, x, y)
            done.put("")
            while go.get():
                _call(client, case, x, y)
                done.put("")
    except Exception as err:  # reported to the parent, which raises it
        done.put(repr(err))


def _sequential_and_concurrent(call_a: Callable[[], object], call_b: Callable[[], object],
                               cpu: Callable[[], float], rounds: tuple[int, int],
                               budget_s: float
                               ) -> tuple[Timing, Timing, Timing, tuple[float, float, float]]:
    """Wall times of (one call, a then b, a and b on two threads started together), over
    at least ``rounds[0]`` and at most ``rounds[1]`` rounds, stopping after ``budget_s``;
    and, of the processes involved (``cpu()``: the CPU seconds they have used so far), the
    mean CPU seconds per call (one at a time, two at once) and the cores busy while the
    calls ran one at a time."""
    call_a()
    call_b()
    one: list[float] = []
    sequential: list[float] = []
    concurrent: list[float] = []
    cpu_sequential = cpu_concurrent = 0.0
    started = time.perf_counter()
    while len(sequential) < rounds[1] and (
            len(sequential) < rounds[0] or time.perf_counter() - started < budget_s):
        cpu_before = cpu()
        start = time.perf_counter()
        call_a()
        middle = time.perf_counter()
        call_b()
        end = time.perf_counter()
        cpu_middle = cpu()
        one += [middle - start, end - middle]
        sequential.append(end - start)
        concurrent.append(_together([call_a, call_b]))
        cpu_sequential += cpu_middle - cpu_before
        cpu_concurrent += cpu() - cpu_middle
    calls = 2 * len(sequential)
    return (Timing(tuple(one)), Timing(tuple(sequential)), Timing(tuple(concurrent)),
            (cpu_sequential / calls, cpu_concurrent / calls, cpu_sequential / sum(sequential)))


def _cpu_of(pids: list[int]) -> Callable[[], float]:
    """CPU seconds used so far by this process and ``pids``."""
    return lambda: time.process_time() + sum(process_cpu_seconds(pid) for pid in pids)


def concurrency(quick: bool, untuned: bool) -> tuple[str, list[str]]:
    cases = [sparse_ce(512, 32000), mse(4_000_000)] if quick else [
        sparse_ce(2048, 32000), mse(16_000_000)]
    rounds, budget_s = ((2, 5), 3.0) if quick else ((2, 7), 12.0)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with ServerProcess(lossgrad_command(max_workers(), untuned)) as server, \
            _client(server.address) as client_a, _client(server.address) as client_b:
        for case in cases:
            x, y = inputs(case)
            label = f"{case.loss} {case.size_label}"
            with _Worker(server.address, case) as worker_a, \
                    _Worker(server.address, case) as worker_b:
                runs = [
                    ("in-process, 2 Python threads",
                     lambda c=case, a=x, b=y: lossgrad.compute(c.loss, a, b, **c.params),
                     lambda c=case, a=x, b=y: lossgrad.compute(c.loss, a, b, **c.params),
                     _cpu_of([])),
                    ("through the server, 2 client threads",
                     lambda c=case, a=x, b=y: _call(client_a, c, a, b),
                     lambda c=case, a=x, b=y: _call(client_b, c, a, b),
                     _cpu_of([server.pid])),
                    ("through the server, 2 client processes",
                     worker_a.call, worker_b.call,
                     _cpu_of([server.pid, worker_a.pid, worker_b.pid])),
                ]
                for mode, call_a, call_b, cpu in runs:
                    one, seq, conc, (cpu_alone, cpu_together, busy) = _sequential_and_concurrent(
                        call_a, call_b, cpu, rounds, budget_s)
                    print(f"  concurrency {label} {mode}: 2 sequential {seq.ms():.1f} ms, "
                          f"2 concurrent {conc.ms():.1f} ms, CPU per call "
                          f"{cpu_alone * 1e3:.1f} / {cpu_together * 1e3:.1f} ms", flush=True)
                    rows.append([label, f"{request_bytes(x, y) / MB:.0f}", mode,
                                 fmt_ms(one.ms()), fmt_ms(seq.ms()), fmt_ms(conc.ms()),
                                 fmt_ratio(conc.ms() / seq.ms()),
                                 f"{fmt_ms(cpu_alone * 1e3)} / {fmt_ms(cpu_together * 1e3)}",
                                 f"{busy:.2f}", str(seq.n)])
    header = ["request", "request MB", "callers", "one call ms", "2 sequential ms",
              "2 concurrent ms", "concurrent / sequential",
              "CPU ms per call, alone / two at once", "cores busy, one call alone", "rounds"]
    note = ("Medians over rounds (at least 2, more while a time budget lasts) after one "
            "untimed call of each; each round runs the two calls one after the other, then "
            "on two threads released together (wall time until both return). "
            f"Server: `lossgrad serve --max-workers {max_workers()}`; the two clients "
            "have separate channels (*client threads*: two clients in this process; *client "
            "processes*: one client in each of two spawned processes, as two training "
            "workers); requests over 32 MiB go by ComputeStream, the client's default.\n\n"
            "*CPU per call*: the CPU time of every process involved (this one, the server, "
            "the client processes), per call, while the calls ran one at a time and while "
            "two ran at once; *cores busy*: that CPU time over the wall time of the calls made "
            "one at a time. The "
            f"clients share this machine's {cores} cores with the server, so two calls at "
            "once can gain over two in a row only as far as a lone call leaves cores idle "
            "and their CPU time stays the same.\n\n")
    return note + table(header, rows), []


# --- section 5: server peak memory -----------------------------------------------------

def memory(quick: bool, untuned: bool) -> tuple[str, list[str]]:
    cases = [mse(10**5), mse(10**6), mse(4_000_000)]
    cases += [] if quick else [mse(16_000_000), sparse_ce(2048, 32000)]
    rows = []
    runs = []
    for case in cases:  # past the client's stream threshold: both paths
        big = request_bytes(*inputs(case)) > DEFAULT_STREAM_THRESHOLD_BYTES
        runs += [(case, "stream", None), (case, "unary", False)] if big else [
            (case, "unary", None)]
    for case, path, stream in runs:
        x, y = inputs(case)
        size = request_bytes(x, y)
        with ServerProcess(lossgrad_command(max_workers(), untuned)) as server, \
                _client(server.address) as client_a, _client(server.address) as client_b:
            base = server.status("VmRSS")
            for _ in range(SEQUENTIAL_CALLS):
                _call(client_a, case, x, y, stream)
            peak_sequential = server.status("VmHWM")
            for _ in range(CONCURRENT_ROUNDS):
                _together([partial(_call, c, case, x, y, stream)
                           for c in (client_a, client_b)])
            peak_concurrent = server.status("VmHWM")
            after = server.status("VmRSS")
        print(f"  memory {case.loss} {case.size_label} {path}: base {base / MB:.0f} MB, "
              f"peak {peak_sequential / MB:.0f} / {peak_concurrent / MB:.0f} MB", flush=True)
        rows.append([
            f"{case.loss} {case.size_label}", path, f"{size / MB:.3g}", f"{base / MB:.0f}",
            f"{peak_sequential / MB:.0f}", f"{(peak_sequential - base) / size:.2f}",
            f"{peak_concurrent / MB:.0f}", f"{(peak_concurrent - base) / size:.2f}",
            f"{after / MB:.0f}",
        ])
    header = ["request", "path", "request MB", "RSS at start MB",
              f"peak after {SEQUENTIAL_CALLS} sequential MB", "(peak − start) / request",
              f"peak after {CONCURRENT_ROUNDS}×2 concurrent MB",
              "(peak − start) / request", "RSS after burst MB"]
    return table(header, rows), []


MEMORY_NOTE = (
    "A fresh server per row. *RSS at start*: `VmRSS` once the server is ready (kernels "
    "loaded and warmed). Peaks are `VmHWM` from `/proc/PID/status` after "
    f"{SEQUENTIAL_CALLS} sequential calls, then after {CONCURRENT_ROUNDS} round(s) of 2 "
    "concurrent calls from two clients (the peak only grows). *RSS after burst*: `VmRSS` "
    "when the calls are done (memory the allocator kept). Requests are float32. *path*: "
    "the client sends requests over 32 MiB by ComputeStream (16 MiB chunks), its default, "
    "so those rows are measured both ways: *stream* as it sends them, *unary* as one "
    "message (`stream=False`).\n")

SECTIONS: dict[str, Callable[[bool, bool], tuple[str, list[str]]]] = {
    "e2e": e2e,
    "concurrency": concurrency,
    "memory": memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", choices=sorted(SECTIONS), required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--untuned-server", action="store_true",
                        help="switch off lossgrad serve's own malloc tuning")
    parser.add_argument("--io-cpu", action="store_true",
                        help="e2e: lossgrad serve --io-cpu auto, the echo server on that CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.section == "e2e":
        markdown, problems = e2e(args.quick, args.untuned_server, args.io_cpu)
    else:
        markdown, problems = SECTIONS[args.section](args.quick, args.untuned_server)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    args.out.write_text(json.dumps({"markdown": markdown, "problems": problems,
                                    "malloc_env": malloc}))


if __name__ == "__main__":
    main()
