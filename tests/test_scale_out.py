"""Scale-out on one machine: three replicas behind one client, one replica stopped mid-load.

Three servers (the real servicer, each counting its calls) on loopback ports; one
LossClient with round_robin and retries on UNAVAILABLE sends a bounded load from three
threads. After a third of the calls one replica stops (``grace=1.0``, as on SIGTERM): the
load must complete with zero failed calls, every result must equal the in-process
``lossgrad.compute`` bit for bit, all three replicas must have taken calls before the stop
and the stopped one none after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from lossgrad import compute
from lossgrad_client import LossClient
from replicas import Replica

pytestmark = pytest.mark.e2e

THREADS = 3
CALLS_PER_THREAD = 100
STOP_AFTER = 100  # completed calls before one replica stops
LOAD_BUDGET_S = 20.0

RNG = np.random.default_rng(5)
LOGITS = RNG.normal(size=(64, 10)).astype(np.float32)
LABELS = RNG.integers(0, 10, 64)
PARAMS = {"from_logits": True, "label_smoothing": 0.1}


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    servers = [Replica() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_stopping_a_replica_mid_load_fails_no_call(replicas: list[Replica]) -> None:
    expected = compute("sparse_categorical_cross_entropy", LOGITS, LABELS, **PARAMS)
    deadline = time.monotonic() + LOAD_BUDGET_S
    lock = threading.Lock()
    completed = 0
    stop_now = threading.Event()
    mismatches: list[int] = []

    def worker(client: LossClient) -> int:
        nonlocal completed
        done = 0
        for _ in range(CALLS_PER_THREAD):
            if time.monotonic() > deadline:
                break
            result = client.compute_gradient("sparse_categorical_cross_entropy", LOGITS,
                                             LABELS, **PARAMS)
            if (result.loss != expected.loss
                    or result.gradient.tobytes() != expected.gradient.tobytes()):
                mismatches.append(done)
            done += 1
            with lock:
                completed += 1
                if completed == STOP_AFTER:
                    stop_now.set()
        return done

    def count(replica: Replica) -> int:
        return replica.counter.count("ComputeGradient")

    with LossClient([r.address for r in replicas], timeout=10) as client, \
            ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(worker, client) for _ in range(THREADS)]
        assert stop_now.wait(LOAD_BUDGET_S), "the load never reached the stop point"
        before = [count(r) for r in replicas]
        replicas[0].stop(grace=1.0)
        at_stop = count(replicas[0])
        # Every call either completes or raises; result() re-raises a failed call here.
        done = sum(future.result(timeout=LOAD_BUDGET_S + 5) for future in futures)

    after = [count(r) for r in replicas]
    assert done == THREADS * CALLS_PER_THREAD, "the load ran out of time"
    assert not mismatches
    assert min(before) > 0, before  # all three took calls before the stop
    assert after[0] == at_stop, (at_stop, after)  # the stopped one took none after
    assert sum(after[1:]) > sum(before[1:]), (before, after)  # the others carried on
    assert sum(after) >= done  # retried attempts are counted where they landed
