"""Section 1: the in-process engine against NumPy, PyTorch and a memory-copy floor."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lossgrad
import numpy as np
import reference_numpy
import torch
from cases import Case, bce_logits, dense_ce, huber, inputs, kl_log, mse, sparse_ce
from measure import Timing, calmly, fmt_ms, fmt_ratio, interleaved, table
from reference_torch import LOSSES as TORCH_LOSSES
from reference_torch import TorchStep
from servers import child_env

TORCH_THREADS = 2
# Largest relative difference accepted before a row is flagged: the loss against
# PyTorch's, and max |gradient difference| / max |PyTorch gradient|.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
NUMPY_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


@dataclass(frozen=True)
class Budget:
    seconds: float  # timed seconds per implementation and case (at least min_reps calls)
    min_reps: int
    max_reps: int
    quiet_wait_s: float  # before a row, wait at most this long for other processes to idle
    attempts: int  # rows measured while other processes used > 25% of a core are redone


def budget(quick: bool) -> Budget:
    return Budget(0.25, 3, 40, 0.5, 1) if quick else Budget(1.0, 7, 200, 3.0, 2)


def gradient_cases(quick: bool) -> list[Case]:
    sizes = [10**3, 10**5, 10**6] + ([] if quick else [16_000_000])
    found: list[Case] = []
    for n in sizes:
        found += [mse(n), bce_logits(n), huber(n)]
    found += [mse(10**6, "float64")] + ([] if quick else [mse(16_000_000, "float64")])
    found += [sparse_ce(256, 10), sparse_ce(4096, 1000)]
    found += [] if quick else [sparse_ce(2048, 32000)]
    found += [dense_ce(4096, 1000), kl_log(4096, 1000)]
    return found


def loss_only_cases() -> list[Case]:
    return [mse(10**6), sparse_ce(4096, 1000)]


@dataclass(frozen=True)
class Row:
    case: Case
    lossgrad: Timing
    numpy: Timing
    torch: Timing
    roofline: Timing
    roofline_fresh: Timing
    loss_diff: float
    grad_diff: float
    numpy_diff: float
    ok: bool
    other_load: float = 0.0  # other processes' CPU while this row was timed (cores)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _grad_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a.astype(np.float64) - b))) / max(scale, 1e-300)


def measure_case(case: Case, b: Budget) -> Row:
    x, y = inputs(case)
    step = TorchStep(case.family, x, y)
    numpy_fn = reference_numpy.LOSSES[case.family]

    # Correctness first: never time a wrong answer.
    result = lossgrad.compute(case.loss, x, y, **case.params)
    torch_loss, torch_grad = step()
    numpy_loss, numpy_grad = numpy_fn(x, y)
    assert result.gradient is not None
    loss_diff = _relative(float(result.loss), torch_loss)
    grad_diff = _grad_diff(result.gradient, torch_grad)
    numpy_diff = max(_relative(numpy_loss, torch_loss), _grad_diff(numpy_grad, torch_grad))
    tol = TOLERANCE[case.dtype]
    ok = loss_diff <= tol and grad_diff <= tol and numpy_diff <= NUMPY_TOLERANCE[case.dtype]
    del result, torch_grad, numpy_grad

    out = np.empty_like(x)
    out.fill(0)  # touch every page: this floor pays no page faults

    def roofline() -> None:
        np.copyto(out, x)
        y.max()

    def roofline_fresh() -> None:
        np.copyto(np.empty_like(x), x)
        y.max()

    gc.collect()
    t = interleaved({
        "lossgrad": lambda: lossgrad.compute(case.loss, x, y, **case.params),
        "numpy": lambda: numpy_fn(x, y),
        "torch": step,
        "roofline": roofline,
        "roofline_fresh": roofline_fresh,
    }, budget_s=b.seconds, min_reps=b.min_reps, max_reps=b.max_reps)
    return Row(case=case, lossgrad=t["lossgrad"], numpy=t["numpy"], torch=t["torch"],
               roofline=t["roofline"], roofline_fresh=t["roofline_fresh"],
               loss_diff=loss_diff, grad_diff=grad_diff, numpy_diff=numpy_diff, ok=ok)


@dataclass(frozen=True)
class LossOnlyRow:
    case: Case
    lossgrad: Timing
    lossgrad_with_gradient: Timing
    torch_forward: Timing
    read_floor: Timing


def measure_loss_only(case: Case, b: Budget) -> LossOnlyRow:
    x, y = inputs(case)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    fn = TORCH_LOSSES[case.family]

    def torch_forward() -> float:
        with torch.no_grad():
            return float(fn(tx, ty))

    def read_floor() -> None:
        x.max()
        y.max()

    t = interleaved({
        "loss": lambda: lossgrad.compute(case.loss, x, y, gradient=False, **case.params),
        "gradient": lambda: lossgrad.compute(case.loss, x, y, **case.params),
        "torch": torch_forward,
        "floor": read_floor,
    }, budget_s=b.seconds, min_reps=b.min_reps, max_reps=b.max_reps)
    return LossOnlyRow(case=case, lossgrad=t["loss"], lossgrad_with_gradient=t["gradient"],
                       torch_forward=t["torch"], read_floor=t["floor"])


def hessian_cases() -> list[Case]:
    return [mse(10**6, "float64"), bce_logits(10**6), sparse_ce(4096, 1000)]


@dataclass(frozen=True)
class HessianRow:
    case: Case
    gradient: Timing
    with_hessian: Timing


def measure_hessian(case: Case, b: Budget) -> HessianRow:
    """The same call with and without the diagonal Hessian (its own kernels)."""
    x, y = inputs(case)
    t = interleaved({
        "gradient": lambda: lossgrad.compute(case.loss, x, y, **case.params),
        "hessian": lambda: lossgrad.compute(case.loss, x, y, hessian="clipped", **case.params),
    }, budget_s=b.seconds, min_reps=b.min_reps, max_reps=b.max_reps)
    return HessianRow(case=case, gradient=t["gradient"], with_hessian=t["hessian"])


def _p50_p90(t: Timing) -> str:
    return f"{fmt_ms(t.ms(50))} / {fmt_ms(t.ms(90))}"


NAMES = {
    "mse": "MSE",
    "huber": "Huber (δ=1)",
    "bce_logits": "BCE with logits",
    "sparse_ce": "softmax CE, int labels",
    "dense_ce": "softmax CE, prob. targets",
    "kl_log": "KL (log q input)",
}


def render(rows: list[Row], loss_only: list[LossOnlyRow], hessian: str = "") -> str:
    header = ["loss", "size", "dtype", "lossgrad ms", "NumPy ms", "PyTorch ms",
              "copy floor ms", "copy floor, fresh out ms", "torch / lossgrad",
              "lossgrad / floor", "reps", "loss rel. diff vs torch", "grad diff",
              "other load"]
    body = []
    for r in rows:
        lg = r.lossgrad.ms()
        body.append([
            NAMES[r.case.family], r.case.size_label, r.case.dtype,
            _p50_p90(r.lossgrad), _p50_p90(r.numpy), _p50_p90(r.torch),
            fmt_ms(r.roofline.ms()), fmt_ms(r.roofline_fresh.ms()),
            fmt_ratio(r.torch.ms() / lg), fmt_ratio(lg / r.roofline.ms()),
            str(r.lossgrad.n),
            f"{r.loss_diff:.1e}", f"{r.grad_diff:.1e}" + ("" if r.ok else " **MISMATCH**"),
            f"{100 * r.other_load:.0f}%",
        ])
    text = table(header, body)
    text += "\nLoss only (`gradient=False`) against the same call with the gradient:\n\n"
    header2 = ["loss", "size", "lossgrad, loss only ms", "lossgrad, with gradient ms",
               "PyTorch forward (no_grad) ms", "read floor ms"]
    body2 = [[NAMES[r.case.family], r.case.size_label, _p50_p90(r.lossgrad),
              _p50_p90(r.lossgrad_with_gradient), _p50_p90(r.torch_forward),
              fmt_ms(r.read_floor.ms())] for r in loss_only]
    return text + table(header2, body2) + hessian


def render_hessian(rows: list[HessianRow]) -> str:
    header = ["loss", "size", "dtype", "gradient ms", "gradient + Hessian ms",
              "with / without"]
    body = [[NAMES[r.case.family], r.case.size_label, r.case.dtype, _p50_p90(r.gradient),
             _p50_p90(r.with_hessian), fmt_ratio(r.with_hessian.ms() / r.gradient.ms())]
            for r in rows]
    return ("\nThe gradient with the diagonal Hessian (`hessian=\"clipped\"`, its own "
            "kernels) against the gradient alone, in a child process whose glibc malloc keeps "
            "freed blocks as `lossgrad serve` tunes it (untuned, the second output array "
            "defeats glibc's adaptive thresholds and each call pays page faults):\n\n"
            + table(header, body))


def hessian_section(quick: bool) -> str:
    """The Hessian table, measured in a child process with the server's malloc tuning."""
    args = [sys.executable, str(Path(__file__)), "--hessian"] + (["--quick"] if quick else [])
    done = subprocess.run(args, env=child_env(True), capture_output=True, text=True,
                          timeout=600, check=True)
    return done.stdout


METHOD = """\
Each cell is median / p90 over repeated calls in one warm process: each function is
called once untimed, then at least {min_reps} and at most {max_reps} timed calls, or until
{seconds:g} s of calls; the implementations of a row take turns in five rounds, so a burst
of load from other processes affects them alike. Each turn starts with 15 ms of untimed
calls: PyTorch's OpenMP threads spin-wait about 10 ms after each call, and timed in that
window lossgrad's parallel kernels lose a core to them (MSE 1e5: 26 µs → 40 µs). Inputs
are seeded (`bench/cases.py`); the reduction is `mean`.

- **lossgrad**: `lossgrad.compute(loss, predictions, targets, **params)`, which allocates
  a fresh gradient per call.
- **NumPy**: `bench/reference_numpy.py`, a straightforward vectorised loss + gradient in the
  inputs' dtype (`np.logaddexp` softplus, max-subtracted softmax); single-threaded.
- **PyTorch**: `torch.from_numpy` of the same arrays, `requires_grad_()`, the built-in
  `torch.nn.functional` loss and `backward()`, `grad = None` before each step (included);
  `torch.set_num_threads({torch_threads})`.
- **copy floor**: `np.copyto(out, predictions)` into a preallocated, already-touched array
  plus one read pass over the targets (`targets.max()`): reading the inputs and writing a
  gradient once, single-threaded. **fresh out** is the same with `out = np.empty_like(...)`
  each call, so it also pays the page faults of a new gradient buffer, as lossgrad and
  PyTorch do. lossgrad runs on {threads} threads, so it can beat the single-threaded floor.
- **checks**: before timing, lossgrad's loss must match PyTorch's within {tol32:g} relative
  (float32; {tol64:g} for float64), and max |Δgradient| / max |PyTorch gradient| likewise;
  the NumPy baseline must match within {ntol32:g}. A failing row is marked **MISMATCH**.
- **other load**: CPU that other processes used while the row was timed, in % of one
  core. Before each row the run waits up to {quiet:g} s for idle CPUs, and a row timed under
  more than 25% is measured again ({attempts} attempt(s) in all, early in the run; the
  calmest is kept).
- **read floor** (loss only): `predictions.max()` + `targets.max()`.
"""


def run(quick: bool) -> tuple[str, list[str]]:
    """Run section 1; return its Markdown and a list of problems (mismatches)."""
    import numba

    torch.set_num_threads(TORCH_THREADS)
    b = budget(quick)
    rows = []
    for case in gradient_cases(quick):
        row, other = calmly(lambda c=case: measure_case(c, b), max_wait_s=b.quiet_wait_s,
                            attempts=b.attempts)
        row = dataclasses.replace(row, other_load=other)
        print(f"  engine {case.loss} {case.size_label} {case.dtype}: "
              f"lossgrad {row.lossgrad.ms():.3f} ms, numpy {row.numpy.ms():.3f}, "
              f"torch {row.torch.ms():.3f}, floor {row.roofline.ms():.3f}", flush=True)
        rows.append(row)
        gc.collect()
    loss_only = [calmly(lambda c=case: measure_loss_only(c, b), max_wait_s=b.quiet_wait_s,
                        attempts=b.attempts)[0] for case in loss_only_cases()]
    hessian = hessian_section(quick)
    problems = [f"{r.case.loss} {r.case.size_label} {r.case.dtype}: loss rel. diff "
                f"{r.loss_diff:.2e}, grad diff {r.grad_diff:.2e}, numpy diff {r.numpy_diff:.2e}"
                for r in rows if not r.ok]
    method = METHOD.format(min_reps=b.min_reps, max_reps=b.max_reps, seconds=b.seconds,
                           torch_threads=TORCH_THREADS, threads=numba.get_num_threads(),
                           tol32=TOLERANCE["float32"], tol64=TOLERANCE["float64"],
                           ntol32=NUMPY_TOLERANCE["float32"], quiet=b.quiet_wait_s,
                           attempts=b.attempts)
    return method + "\n" + render(rows, loss_only, hessian), problems


if __name__ == "__main__" and "--hessian" in sys.argv:
    _b = budget("--quick" in sys.argv)
    sys.stdout.write(render_hessian([
        calmly(lambda c=case: measure_hessian(c, _b), max_wait_s=_b.quiet_wait_s,
               attempts=_b.attempts)[0] for case in hessian_cases()]))
