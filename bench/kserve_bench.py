"""Section 8: the Open Inference Protocol (KServe v2) API under NVIDIA's perf_analyzer,
and the same request through lossgrad's own client, tritonclient and a raw stub.

perf_analyzer is found as ``$PERF_ANALYZER`` (a command), ``bench/.perf_analyzer/
perf_analyzer`` (written by ``bench/get_perf_analyzer.sh``) or ``perf_analyzer`` on the
PATH; tritonclient in ``.venv-tritonclient`` (made by tests/test_kserve_tritonclient.py).
What is missing is reported in the section, with the reason, and the rest still runs.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import lossgrad
import numpy as np
from cases import Case, inputs, mse
from lossgrad._proto.inference import grpc_predict_v2_pb2 as kpb
from lossgrad._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from lossgrad_client import LossClient
from measure import REPO, Timing, fmt_ms, fmt_ratio, interleaved, table
from servers import MAX_MESSAGE_BYTES, ServerProcess, lossgrad_command, max_workers

HERE = Path(__file__).resolve().parent
LOCAL_PERF_ANALYZER = HERE / ".perf_analyzer" / "perf_analyzer"
TRITONCLIENT_PYTHON = REPO / ".venv-tritonclient" / "bin" / "python"
TRITONCLIENT_SCRIPT = HERE / "tritonclient_latency.py"
SIZES = (10**3, 10**6)
CALL_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300
UNSTABLE = 1000  # --stability-percentage that any three windows meet

WHY_NO_PERF_ANALYZER = """\
perf_analyzer was not found ($PERF_ANALYZER, bench/.perf_analyzer/perf_analyzer, PATH).
Its PyPI wheel (perf-analyzer 2.60.0) is built for manylinux_2_38: pip installs it only
where glibc >= 2.38, and its binary needs the libstdc++ of GCC 13 (GLIBCXX_3.4.32).
`bench/get_perf_analyzer.sh` installs it, with Debian 13's C and C++ runtime beside it on
an older Debian (such as Debian 12: glibc 2.36, GCC 12)."""

NOTE = """\
One `lossgrad serve` on 127.0.0.1 ({workers} worker threads). Model `mse`, inputs
PREDICTIONS and TARGETS (float32, shape [n], seeded random values, raw bytes), outputs
LOSS and GRADIENT (the default: both). First table: NVIDIA's perf_analyzer (C++ gRPC
client, synchronous requests, `--concurrency-range {concurrency}`, measurement windows of
{window} ms until three agree within {stability} %, else any three), its own report.
Second table: one call at a time from Python for about {budget} s per client: lossgrad.v1
through `LossClient.compute_gradient` and the Open Inference Protocol through a raw
generated stub (`ModelInfer`, arrays from `raw_output_contents`), taking turns, then
through tritonclient `InferenceServerClient.infer` (its own process and environment).
Every client's result was checked against the in-process engine (same bits)."""


def find_perf_analyzer() -> tuple[list[str] | None, str]:
    """The command that runs perf_analyzer, or None and why there is none."""
    candidates = []
    if os.environ.get("PERF_ANALYZER"):
        candidates.append(shlex.split(os.environ["PERF_ANALYZER"]))
    if LOCAL_PERF_ANALYZER.exists():
        candidates.append([str(LOCAL_PERF_ANALYZER)])
    on_path = shutil.which("perf_analyzer")
    if on_path:
        candidates.append([on_path])
    failures = []
    for command in candidates:
        try:
            done = subprocess.run([*command, "--version"], capture_output=True, text=True,
                                  timeout=60, check=False)
        except OSError as err:
            failures.append(f"`{shlex.join(command)}`: {err}")
            continue
        if done.returncode == 0:
            return command, (done.stdout.strip() or done.stderr.strip()).splitlines()[0]
        failures.append(f"`{shlex.join(command)} --version` failed: "
                        f"{(done.stderr or done.stdout).strip()[:300]}")
    return None, "\n".join([WHY_NO_PERF_ANALYZER, *failures])


def run(quick: bool) -> tuple[str, list[str]]:
    perf_analyzer, about = find_perf_analyzer()
    settings = {"concurrency": "1" if quick else "1:2", "window": 1000 if quick else 3000,
                "stability": 25, "budget": 2 if quick else 6}
    problems: list[str] = []
    perf_rows: list[list[str]] = []
    client_rows: list[list[str]] = []
    with ServerProcess(lossgrad_command(max_workers())) as server, \
            tempfile.TemporaryDirectory(prefix="lossgrad-kserve-bench-") as tmp:
        for n in SIZES:
            case = mse(n)
            x, y = inputs(case)
            print(f"  kserve mse {case.size_label}", flush=True)
            if perf_analyzer is not None:
                perf_rows += _perf_analyzer(perf_analyzer, server.address, case, x, y,
                                            Path(tmp), settings, problems)
            client_rows.append(_clients(server.address, case, x, y, Path(tmp),
                                        float(settings["budget"]), problems))
    text = NOTE.format(workers=max_workers(), **settings) + "\n\n"
    if perf_analyzer is None:
        text += "perf_analyzer: not run. " + about + "\n\n"
    else:
        text += f"perf_analyzer: `{about}`.\n\n" + table(
            ["MSE size (float32)", "concurrency", "inferences/s", "p50 µs", "p90 µs",
             "p95 µs", "p99 µs", "windows agreed within"], perf_rows) + "\n"
    text += table(["MSE size (float32)", "LossClient p50 / p99 ms",
                   "tritonclient p50 / p99 ms", "raw KServe stub p50 / p99 ms",
                   "tritonclient / LossClient (p50)", "calls (LossClient / tritonclient / stub)"],
                  client_rows)
    return text, problems


# --- perf_analyzer -----------------------------------------------------------------------

def _perf_analyzer(command: list[str], address: str, case: Case, x: np.ndarray,
                   y: np.ndarray, tmp: Path, settings: dict[str, Any],
                   problems: list[str]) -> list[list[str]]:
    """perf_analyzer's rows (one per concurrency) for one request."""
    data = tmp / f"input-{case.elements}.json"
    data.write_text(json.dumps({"data": [{
        name: {"b64": base64.b64encode(array.tobytes()).decode("ascii"),
               "shape": list(array.shape)}
        for name, array in (("PREDICTIONS", x), ("TARGETS", y))}]}))
    report = tmp / f"perf-{case.elements}.csv"
    # perf_analyzer reports nothing until three windows agree; on a busy machine they may
    # not, and a second run accepts any three windows (the table says which it took).
    for stability in (settings["stability"], UNSTABLE):
        args = [*command, "-m", case.loss, "-i", "grpc", "-u", address, "--input-data",
                str(data), "--concurrency-range", str(settings["concurrency"]),
                "--measurement-interval", str(settings["window"]),
                "--stability-percentage", str(stability), "--max-trials", "10",
                "-f", str(report)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)
        if done.returncode == 0 and report.exists():
            break
    else:
        problems.append(f"perf_analyzer on mse {case.size_label} failed "
                        f"(exit {done.returncode}): {done.stdout[-600:]} {done.stderr[-600:]}")
        return []
    rows = []
    with report.open() as f:
        for row in sorted(csv.DictReader(f), key=lambda r: int(r["Concurrency"])):
            rows.append([case.size_label, row["Concurrency"],
                         f"{float(row['Inferences/Second']):.0f}",
                         *(row[f"p{q} latency"] for q in (50, 90, 95, 99)), f"{stability} %"])
    return rows


# --- Python clients ------------------------------------------------------------------------

def _infer_request(case: Case, x: np.ndarray, y: np.ndarray) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=case.loss)
    for name, array in (("PREDICTIONS", x), ("TARGETS", y)):
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def _stub_outputs(response: kpb.ModelInferResponse) -> tuple[float, np.ndarray]:
    loss = np.frombuffer(response.raw_output_contents[0], "<f8")[0]
    return float(loss), np.frombuffer(response.raw_output_contents[1], "<f4")


def _clients(address: str, case: Case, x: np.ndarray, y: np.ndarray, tmp: Path,
             budget_s: float, problems: list[str]) -> list[str]:
    local = lossgrad.compute(case.loss, x, y)
    assert local.gradient is not None
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with LossClient(address, timeout=CALL_TIMEOUT_S, options=options[:1]) as client, \
            grpc.insecure_channel(address, options=options) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        request = _infer_request(case, x, y)
        native = client.compute_gradient(case.loss, x, y)
        loss, gradient = _stub_outputs(stub.ModelInfer(request, timeout=CALL_TIMEOUT_S))
        if not (native.loss == loss == local.loss
                and native.gradient.tobytes() == gradient.tobytes() == local.gradient.tobytes()):
            problems.append(f"kserve mse {case.size_label}: results differ from in-process")
        timings = interleaved({
            "native": lambda: client.compute_gradient(case.loss, x, y),
            "stub": lambda: stub.ModelInfer(request, timeout=CALL_TIMEOUT_S),
        }, budget_s=budget_s, min_reps=5, max_reps=3000)
    triton = _tritonclient(address, case, x, y, local, tmp, budget_s, problems)
    native_t, stub_t = timings["native"], timings["stub"]

    def cell(t: Timing | None) -> str:
        return "—" if t is None else f"{fmt_ms(t.ms(50))} / {fmt_ms(t.ms(99))}"

    return [case.size_label, cell(native_t), cell(triton), cell(stub_t),
            "—" if triton is None else fmt_ratio(triton.ms() / native_t.ms()),
            f"{native_t.n} / {'—' if triton is None else triton.n} / {stub_t.n}"]


def _tritonclient(address: str, case: Case, x: np.ndarray, y: np.ndarray,
                  local: lossgrad.Result, tmp: Path, budget_s: float,
                  problems: list[str]) -> Timing | None:
    """Time tritonclient's infer in its own environment; None if there is none."""
    if not TRITONCLIENT_PYTHON.exists():
        problems.append("tritonclient not timed: no .venv-tritonclient (run "
                        "./dev test tests/test_kserve_tritonclient.py once to create it)")
        return None
    data = tmp / f"clients-{case.elements}.npz"
    np.savez(data, x=x, y=y)
    out = tmp / f"tritonclient-{case.elements}.npz"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(TRITONCLIENT_PYTHON), str(TRITONCLIENT_SCRIPT), address,
                           case.loss, str(data), str(out), str(budget_s)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
                          check=False)
    if done.returncode != 0:
        problems.append(f"tritonclient on mse {case.size_label} failed: {done.stderr[-800:]}")
        return None
    result = np.load(out)
    assert local.gradient is not None
    if not (float(result["loss"][0]) == local.loss
            and result["gradient"].tobytes() == local.gradient.tobytes()):
        problems.append(f"kserve mse {case.size_label}: tritonclient's result differs")
    return Timing(tuple(float(s) for s in result["seconds"]))


if __name__ == "__main__":
    markdown, found = run("--quick" in sys.argv)
    print(markdown)
    for problem in found:
        print("PROBLEM:", problem, file=sys.stderr)
