"""Section 7: plugin losses, with lossgrad's vectorisable math against ``math``'s libm.

``lossgrad.compute`` with the gradient at 1e6 elements, in one child process that loads
two plugins: the example Fair loss (examples/plugin, whose element function calls
``lossgrad.plugin.log1p``) and the same function calling ``math.log1p`` (below), timed in
turns with the built-in ``pseudo_huber`` (the same shape of loss, built in). Each result
is checked against a float64 NumPy reference.

    python bench/plugin_bench.py [--quick]      # prints the table
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from cases import SEED
from lossgrad.plugin import Loss, Param, fconst
from measure import REPO, calmly, fmt_ms, fmt_ratio, interleaved, table
from parallel_bench import forced_path

HERE = Path(__file__).resolve().parent
WORKER_TIMEOUT_S = 600
N = 1_000_000
LOSSES = ("pseudo_huber", "fair", "fair_libm")
# Relative error of the mean loss and largest gradient error (relative to the largest
# gradient) allowed against the float64 reference.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def fair_libm(x, y, c):  # type: ignore[no-untyped-def]
    """The example's Fair loss with ``math.log1p``: a scalar libm call per element."""
    r = x - y
    u = abs(r) / c
    return c * c * (u - math.log1p(u)), r / (fconst(x, 1.0) + u)


LIBM = Loss("fair_libm", fair_libm, "the Fair loss with math.log1p",
            params=(Param("c", 1.0, "scale", minimum=0.0, minimum_inclusive=False),))


def _reference(loss: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss and gradient in float64 (pseudo_huber with delta 1, Fair with c 1)."""
    r = x.astype(np.float64) - y
    if loss == "pseudo_huber":
        s = np.sqrt(1.0 + r * r)
        return float(np.mean(s - 1.0)), r / s / r.size
    u = np.abs(r)
    return float(np.mean(u - np.log1p(u))), r / (1.0 + u) / r.size


def worker(quick: bool) -> dict[str, Any]:
    """Child process: load the plugins, check and time each loss per dtype and path."""
    from importlib import metadata

    import lossgrad
    import numba
    from lossgrad import plugin

    sys.path.insert(0, str(REPO / "examples" / "plugin"))
    plugin.load(entry_points=[
        metadata.EntryPoint("fair", "lossgrad_fair:LOSSES", plugin.GROUP),
        metadata.EntryPoint("fair_libm", "plugin_bench:LIBM", plugin.GROUP),
    ], errors="fail")
    budget = ({"budget_s": 0.25, "min_reps": 3, "max_reps": 40} if quick
              else {"budget_s": 1.0, "min_reps": 7, "max_reps": 200})
    rng = np.random.default_rng(SEED)
    rows: list[dict[str, Any]] = []
    for dtype in ("float32", "float64"):
        x = (rng.standard_normal(N) * 3).astype(dtype)
        y = rng.standard_normal(N).astype(dtype)
        for loss in LOSSES:
            got = lossgrad.compute(loss, x, y)
            assert got.gradient is not None
            want_loss, want_grad = _reference(loss, x, y)
            rows.append({"dtype": dtype, "loss": loss,
                         "loss_error": abs(float(got.loss) - want_loss) / abs(want_loss),
                         "grad_error": float(np.max(np.abs(got.gradient - want_grad))
                                             / np.max(np.abs(want_grad)))})
        for parallel in (False, True):
            def call(loss: str, p: bool = parallel, a: np.ndarray = x,
                     t: np.ndarray = y) -> None:
                with forced_path(p):
                    lossgrad.compute(loss, a, t)

            fns = {loss: (lambda name=loss: call(name)) for loss in LOSSES}
            times, _ = calmly(lambda f=fns: interleaved(f, **budget),
                                  max_wait_s=0.5 if quick else 3.0, attempts=1 if quick else 2)
            for row in rows:
                if row["dtype"] == dtype:
                    row["parallel" if parallel else "serial"] = times[row["loss"]].ms()
    return {"rows": rows, "threads": numba.get_num_threads(),
            "layer": numba.threading_layer()}


def run(quick: bool) -> tuple[str, list[str]]:
    args = [sys.executable, str(HERE / "plugin_bench.py"), "--worker"]
    args += ["--quick"] if quick else []
    done = subprocess.run(args, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"plugin worker failed ({done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    problems = []
    body = []
    base = {(r["dtype"], p): r[p] for r in result["rows"] if r["loss"] == "pseudo_huber"
            for p in ("serial", "parallel")}
    for r in result["rows"]:
        bound = TOLERANCE[r["dtype"]]
        ok = r["loss_error"] <= bound and r["grad_error"] <= bound
        if not ok:
            problems.append(f"{r['loss']} {r['dtype']}: loss error {r['loss_error']:.2e}, "
                            f"gradient error {r['grad_error']:.2e} (bound {bound:g})")
        body.append([
            r["dtype"], f"`{r['loss']}`",
            fmt_ms(r["serial"]), fmt_ratio(r["serial"] / base[(r["dtype"], "serial")]),
            fmt_ms(r["parallel"]), fmt_ratio(r["parallel"] / base[(r["dtype"], "parallel")]),
            f"{r['loss_error']:.1e} / {r['grad_error']:.1e}" + ("" if ok else " **over**"),
        ])
    header = ["dtype", "loss", "serial ms", "× pseudo_huber", f"parallel ms "
              f"({result['threads']} threads)", "× pseudo_huber", "error: mean loss / gradient"]
    method = (
        f"Median ms of `lossgrad.compute(loss, x, y)` with its gradient (mean), {N:.0e} "
        "elements, x = 3 N(0, 1), y = N(0, 1), default parameters (delta = c = 1), in one "
        "process, the three losses timed in turns; *serial* / *parallel*: the engine forced "
        "onto the drivers' serial or parallel path (numba threading layer "
        f"`{result['layer']}`). `fair` is the example plugin (examples/plugin, "
        "`lossgrad.plugin.log1p`); `fair_libm` the same function with `math.log1p`. "
        "*error*: relative error of the mean loss, and the largest gradient error relative "
        "to the largest gradient, against float64 NumPy.\n\n")
    return method + table(header, body), problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="measure and print JSON")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.quick)))
        return
    text, problems = run(args.quick)
    print(text)
    for p in problems:
        print("PROBLEM:", p)


if __name__ == "__main__":
    main()
