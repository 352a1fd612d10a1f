"""Scale-out as deployed: three `lossgrad serve` processes behind one client.

The client gets the three loopback addresses, balances per call with round_robin and
retries on UNAVAILABLE. Each server's own GetServerInfo counts the calls it served. A
bounded load runs from three threads; after a third of it one process gets SIGTERM. The
load must complete with zero failed calls and results equal to the in-process engine's, bit
for bit; every replica must have served calls, and the two left must serve the rest.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

LOSS = "sparse_categorical_cross_entropy"
THREADS = 3
CALLS_PER_THREAD = 60
STOP_AFTER = 60  # completed calls before one replica gets SIGTERM
READY_TIMEOUT_S = 300.0  # a cold numba cache compiles first
LOAD_BUDGET_S = 30.0

RNG = np.random.default_rng(11)
LOGITS = RNG.normal(size=(256, 32)).astype(np.float32)
LABELS = RNG.integers(0, 32, 256)


class ServerProcess:
    """`python -m lossgrad serve --port 0` in a subprocess, with its bound address."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lossgrad", "serve", "--host", "127.0.0.1", "--port", "0",
             "--grace", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout],
                         daemon=True).start()
        line = lines.get(timeout=READY_TIMEOUT_S)
        assert line.startswith("lossgrad serving on "), line
        self.address = line.split()[-1]

    def calls(self) -> int:
        """Calls of LOSS this server has answered, from its own GetServerInfo."""
        with grpc.insecure_channel(self.address) as channel:
            info = pb_grpc.LossServiceStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=30.0)
        return sum(s.calls for s in info.loss_statistics if s.loss == LOSS)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for _ in range(3):
            started.append(ServerProcess())
        yield started
    finally:
        for server in started:
            server.kill()


def test_sigterm_to_one_process_mid_load_fails_no_call(servers: list[ServerProcess]) -> None:
    expected = compute(LOSS, LOGITS, LABELS, from_logits=True)
    deadline = time.monotonic() + LOAD_BUDGET_S
    lock = threading.Lock()
    completed = 0
    stop_now = threading.Event()
    mismatches = 0

    def worker(client: LossClient) -> int:
        nonlocal completed, mismatches
        done = 0
        for _ in range(CALLS_PER_THREAD):
            if time.monotonic() > deadline:
                break
            result = client.compute_gradient(LOSS, LOGITS, LABELS, from_logits=True)
            same = (result.loss == expected.loss
                    and result.gradient.tobytes() == expected.gradient.tobytes())
            with lock:
                completed += 1
                mismatches += not same
                if completed == STOP_AFTER:
                    stop_now.set()
            done += 1
        return done

    with LossClient([s.address for s in servers], retries=4, timeout=30.0) as client:
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(worker, client) for _ in range(THREADS)]
            assert stop_now.wait(LOAD_BUDGET_S), "the load never reached the stop point"
            before = [server.calls() for server in servers]
            assert servers[0].terminate() == 0
            done = sum(f.result(timeout=LOAD_BUDGET_S) for f in futures)  # raises on a failure

    assert done == THREADS * CALLS_PER_THREAD, "the load ran out of time"
    assert mismatches == 0
    assert all(count > 0 for count in before), before  # round_robin spread the calls
    after = [server.calls() for server in servers[1:]]
    assert all(a > b for a, b in zip(after, before[1:], strict=True))  # the two left go on
