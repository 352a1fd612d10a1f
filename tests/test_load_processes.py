"""A bounded loopback load from several client processes against one ``lossgrad serve``.

Each client process (``load_client.py``) makes CALLS_PER_PROCESS compute_gradient calls of
mse, huber, sparse categorical cross-entropy and binary cross-entropy with logits (name and
alias), float32 and float64, and checks every result against its own float64 NumPy
reference. The load must finish within LOAD_BUDGET_S with zero failed calls and zero
mismatches, and the server's GetServerInfo must count every call, by loss, with none failed.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from lossgrad.catalog import lookup
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

PROCESSES = 3
CALLS_PER_PROCESS = 150
LOAD_BUDGET_S = 20.0  # from starting the clients to the last exit (NumPy import included)
READY_TIMEOUT_S = 300.0  # a cold numba cache compiles first
LOAD_CLIENT = Path(__file__).with_name("load_client.py")


def test_three_client_processes_get_correct_results_and_no_failed_call(
        tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "lossgrad", "serve", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True)
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(server.stdout.readline()),  # type: ignore[union-attr]
                         daemon=True).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"the server did not start; stderr:\n{log.read_text()}")
        assert line.startswith("lossgrad serving on 127.0.0.1:"), log.read_text()
        address = line.split()[-1]

        deadline = time.monotonic() + LOAD_BUDGET_S
        clients = [subprocess.Popen(
            [sys.executable, str(LOAD_CLIENT), address, str(seed), str(CALLS_PER_PROCESS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in range(PROCESSES)]
        summaries = []
        for client in clients:  # one budget for all of them
            out, err = client.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            assert client.returncode == 0, err
            summaries.append(json.loads(out))

        for summary in summaries:
            assert summary["calls"] == CALLS_PER_PROCESS
            assert summary["failed"] == 0, summary["problems"]
            assert summary["mismatches"] == 0, summary["problems"]
        sent: Counter[str] = Counter()
        for summary in summaries:
            for name, count in summary["by_loss"].items():
                sent[lookup(name).name] += count
        assert sum(sent.values()) == PROCESSES * CALLS_PER_PROCESS
        assert len(sent) == 4

        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.LossServiceStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=30)
        served = {s.loss: s.calls for s in info.loss_statistics}
        assert served == dict(sent)
        assert sum(s.failed_calls for s in info.loss_statistics) == 0

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text()
    finally:
        for process in (*clients, server):
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=60)
