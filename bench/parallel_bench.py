"""Section 2: serial against parallel kernels, and the bits they give.

Two comparisons of ``lossgrad.compute`` with gradients:

- in this process, with the engine forced onto the drivers' serial path
  (``parallel=False``) and onto the parallel one (``parallel=True``), whatever the size;
- in a child process with ``NUMBA_NUM_THREADS=1`` against one
  with numba's default thread count (``python bench/parallel_bench.py --worker``).

Every variant's loss (as float hex) and gradient bytes (SHA-256) are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cases import Case, bce_logits, inputs, mse, sparse_ce
from measure import Timing, calmly, fmt_ms, fmt_ratio, interleaved, repeat, table

HERE = Path(__file__).resolve().parent
WORKER_TIMEOUT_S = 300


def parallel_cases(quick: bool) -> list[Case]:
    found = [mse(10**5), mse(10**6), bce_logits(10**6), sparse_ce(4096, 1000)]
    return found if quick else found + [mse(16_000_000), sparse_ce(2048, 32000)]


def _budget(quick: bool) -> dict[str, Any]:
    return ({"budget_s": 0.25, "min_reps": 3, "max_reps": 40} if quick
            else {"budget_s": 1.0, "min_reps": 7, "max_reps": 200})


def _calm(quick: bool) -> dict[str, Any]:
    """Wait for idle CPUs before each measurement; redo one taken under load (full mode)."""
    return {"max_wait_s": 0.5, "attempts": 1} if quick else {"max_wait_s": 3.0, "attempts": 2}


def _digest(loss: float, grad: np.ndarray) -> tuple[str, str]:
    return float(loss).hex(), hashlib.sha256(grad.tobytes()).hexdigest()


@contextlib.contextmanager
def forced_path(parallel: bool) -> Iterator[None]:
    """Make the engine pick the serial or the parallel driver path whatever the size, by
    swapping ``runners._parallel`` (the one place ``compute`` decides) for the duration."""
    from lossgrad import runners

    chosen = runners._parallel
    runners._parallel = lambda batch: parallel
    try:
        yield
    finally:
        runners._parallel = chosen


def _compute_timed(case: Case, quick: bool) -> dict[str, Any]:
    import lossgrad
    import numba

    x, y = inputs(case)
    result = lossgrad.compute(case.loss, x, y, **case.params)
    assert result.gradient is not None
    loss_hex, grad_sha = _digest(float(result.loss), result.gradient)
    t = repeat(lambda: lossgrad.compute(case.loss, x, y, **case.params), **_budget(quick))
    return {"ms": t.ms(50), "p90": t.ms(90), "reps": t.n, "loss": loss_hex, "grad": grad_sha,
            "threads": numba.get_num_threads()}


def worker(quick: bool) -> None:
    """Child process: time ``lossgrad.compute`` per case and print JSON on stdout."""
    out = {f"{c.loss} {c.size_label}": _compute_timed(c, quick) for c in parallel_cases(quick)}
    print(json.dumps(out))


def _child(quick: bool, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("NUMBA_NUM_THREADS", None)
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    args = [sys.executable, str(HERE / "parallel_bench.py"), "--worker"]
    args += ["--quick"] if quick else []
    done = subprocess.run(args, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"parallel worker failed ({done.returncode}):\n{done.stderr}")
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def run(quick: bool) -> tuple[str, list[str]]:
    import lossgrad
    import numba

    b = _budget(quick)
    in_process: dict[str, dict[str, Any]] = {}
    for case in parallel_cases(quick):
        x, y = inputs(case)
        entry: dict[str, Any] = {}
        for parallel in (False, True):
            with forced_path(parallel):
                result = lossgrad.compute(case.loss, x, y, **case.params)
            assert result.gradient is not None
            entry[parallel] = _digest(float(result.loss), result.gradient)
            del result

        def on_path(parallel: bool, c: Case = case, a: np.ndarray = x,
                    t: np.ndarray = y) -> None:
            with forced_path(parallel):
                lossgrad.compute(c.loss, a, t, **c.params)

        paths = {"serial": lambda: on_path(False), "parallel": lambda: on_path(True)}
        times, _ = calmly(lambda fns=paths: interleaved(fns, **b), **_calm(quick))
        entry = {False: (entry[False], times["serial"]), True: (entry[True], times["parallel"])}
        in_process[f"{case.loss} {case.size_label}"] = entry
        print(f"  parallel {case.loss} {case.size_label}: serial "
              f"{entry[False][1].ms():.3f} ms, parallel {entry[True][1].ms():.3f} ms", flush=True)
    ones, defaults = [], []
    for _ in range(1 if quick else 2):  # alternate, so one burst of load hits both alike
        ones.append(calmly(lambda: _child(quick, 1), **_calm(quick))[0])
        defaults.append(calmly(lambda: _child(quick, None), **_calm(quick))[0])
    one, default = _fastest(ones), _fastest(defaults)

    header = ["loss", "size", "serial path ms", "parallel path ms", "speedup",
              "compute, 1 thread ms", f"compute, {default_threads(default)} threads ms",
              "speedup", "same bits (4 variants)"]
    body = []
    problems = []
    for case in parallel_cases(quick):
        key = f"{case.loss} {case.size_label}"
        serial_t: Timing = in_process[key][False][1]
        parallel_t: Timing = in_process[key][True][1]
        variants = {
            "serial path": in_process[key][False][0],
            "parallel path": in_process[key][True][0],
            "1 thread": (one[key]["loss"], one[key]["grad"]),
            "default threads": (default[key]["loss"], default[key]["grad"]),
        }
        same = len(set(variants.values())) == 1
        if not same:
            listed = "; ".join(f"{name}: loss {loss}, gradient sha256 {grad[:12]}"
                               for name, (loss, grad) in variants.items())
            problems.append(f"{key}: serial and parallel results differ: {listed}")
        body.append([
            case.loss, case.size_label,
            f"{fmt_ms(serial_t.ms())} / {fmt_ms(serial_t.ms(90))}",
            f"{fmt_ms(parallel_t.ms())} / {fmt_ms(parallel_t.ms(90))}",
            fmt_ratio(serial_t.ms() / parallel_t.ms()),
            f"{fmt_ms(one[key]['ms'])} / {fmt_ms(one[key]['p90'])}",
            f"{fmt_ms(default[key]['ms'])} / {fmt_ms(default[key]['p90'])}",
            fmt_ratio(one[key]["ms"] / default[key]["ms"]),
            "yes" if same else "**NO**",
        ])
    from lossgrad.kernels import _numerics

    children = "" if quick else (
        " (two children of each, alternating; per row the faster one's times)")
    method = (
        "Median / p90 ms of `lossgrad.compute` with its gradient. *serial / parallel path*: "
        "this process with `runners._parallel` (which picks the drivers' `parallel` "
        "argument) swapped to return False / True (numba threading layer "
        f"`{numba.threading_layer()}`, {numba.get_num_threads()} threads). "
        "*compute*: `lossgrad.compute` in a child process with `NUMBA_NUM_THREADS=1` and "
        f"with numba's default{children}. The engine routes inputs of at least "
        f"{_numerics.PARALLEL_MIN} elements to the parallel driver. *same bits*: the loss "
        "(float hex) and SHA-256 of the gradient bytes agree across all four variants.\n\n"
    )
    return method + table(header, body), problems


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case, the child run with the lowest median; its digest becomes "differs" if the
    runs disagree on the bits."""
    merged: dict[str, Any] = {}
    for key in runs[0]:
        entries = [run[key] for run in runs]
        best = dict(min(entries, key=lambda e: e["ms"]))
        if len({(e["loss"], e["grad"]) for e in entries}) > 1:
            best["loss"] = best["grad"] = "differs between runs"
        merged[key] = best
    return merged


def default_threads(result: dict[str, Any]) -> int:
    return int(next(iter(result.values()))["threads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help="time compute and print JSON")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.quick)
    else:
        text, problems = run(args.quick)
        print(text)
        for p in problems:
            print("PROBLEM:", p)


if __name__ == "__main__":
    main()
