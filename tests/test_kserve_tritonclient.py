"""tritonclient (NVIDIA Triton's Python client, unchanged) calls lossgrad's Open Inference
Protocol API: readiness, metadata, inferences whose LOSS and GRADIENT equal lossgrad.v1's
bit for bit, parameters, and the status of bad requests as tritonclient reports it.

tritonclient[grpc] needs protobuf < 7 and lossgrad protobuf >= 7.35, so tritonclient runs
in its own virtual environment (``.venv-tritonclient``, from the pinned
``tritonclient-requirements.txt``; created on first use, kept while the pins and the
Python version are unchanged) and ``tritonclient_calls.py`` makes the calls in a
subprocess. A failed install fails the test: it never skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lossgrad_client import LossClient

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-tritonclient"
REQUIREMENTS = Path(__file__).with_name("tritonclient-requirements.txt")
CALLS = Path(__file__).with_name("tritonclient_calls.py")
README = ROOT / "README.md"
INSTALL_TIMEOUT_S = 600
CALLS_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tritonclient_python() -> Path:
    """The Python of an environment with the pinned tritonclient[grpc]."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:16]
    stamp = VENV / f".installed-{key}"
    python = VENV / "bin" / "python"
    if stamp.exists() and python.exists():
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    steps = ([sys.executable, "-m", "venv", str(VENV)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "-r", str(REQUIREMENTS)])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"installing tritonclient took over {INSTALL_TIMEOUT_S} s: {step}")
        if done.returncode != 0:
            pytest.fail(f"could not install tritonclient ({' '.join(step)}):\n"
                        f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    stamp.touch()
    return python


def _run(python: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(python), *args], capture_output=True, text=True,
                          timeout=CALLS_TIMEOUT_S, env=env, check=False)


@pytest.fixture(scope="module")
def triton_run(tritonclient_python: Path, server_address: str,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run tritonclient_calls.py once against the session's server."""
    out = tmp_path_factory.mktemp("tritonclient")
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, size=12).astype(np.int64)
    labels[5] = -100
    inputs = {
        "x": rng.normal(size=(8, 6)).astype(np.float32),
        "y": rng.normal(size=(8, 6)).astype(np.float32),
        "w": rng.uniform(0.0, 2.0, size=8).astype(np.float32),
        "x64": rng.normal(size=(5, 3)) * 3, "y64": rng.normal(size=(5, 3)),
        "logits": rng.normal(size=(12, 4)).astype(np.float32), "labels": labels,
    }
    np.savez(out / "inputs.npz", **inputs)
    done = _run(tritonclient_python, [str(CALLS), server_address, str(out)])
    assert done.returncode == 0, done.stderr[-4000:]
    return {"inputs": inputs, "outputs": dict(np.load(out / "outputs.npz")),
            "results": json.loads((out / "results.json").read_text())}


def test_tritonclient_sees_a_live_ready_server_and_models(triton_run: dict[str, Any]) -> None:
    results = triton_run["results"]
    assert results["live"] is True and results["ready"] is True
    assert results["server"] == {"name": "lossgrad", "version": "0.1.0"}
    assert results["model_ready"] == {"mse": True, "l2": True, "nope": False}
    meta = results["metadata"]
    assert meta["name"] == "huber" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("PREDICTIONS", "FP32", ["-1"]), ("TARGETS", "FP32", ["-1"]),
        ("SAMPLE_WEIGHT", "FP32", ["-1"])]
    assert [t["name"] for t in meta["outputs"]] == ["LOSS", "GRADIENT", "HESSIAN"]
    config = results["config"]["config"]  # Triton's extension, which perf_analyzer reads
    assert config["name"] == "mse" and config.get("max_batch_size", 0) == 0
    assert [(t["name"], t["data_type"], t.get("optional", False)) for t in config["input"]] == [
        ("PREDICTIONS", "TYPE_FP32", False), ("TARGETS", "TYPE_FP32", False),
        ("SAMPLE_WEIGHT", "TYPE_FP32", True)]


def test_tritonclient_inferences_equal_the_native_api(triton_run: dict[str, Any],
                                                      client: LossClient) -> None:
    data, out = triton_run["inputs"], triton_run["outputs"]
    assert triton_run["results"]["mse_id"] == "tc-1"
    mse = client.compute_gradient("mse", data["x"], data["y"], sample_weight=data["w"])
    assert out["mse_loss"].dtype == np.float64 and out["mse_loss"].shape == (1,)
    assert out["mse_loss"][0] == mse.loss
    assert out["mse_gradient"].dtype == np.float32
    assert out["mse_gradient"].tobytes() == mse.gradient.tobytes()

    huber = client.compute_gradient("huber", data["x64"], data["y64"], delta=0.5,
                                    reduction="none")
    assert isinstance(huber.loss, np.ndarray)
    assert out["huber_loss"].tobytes() == huber.loss.tobytes()
    assert out["huber_gradient"].tobytes() == huber.gradient.tobytes()

    sparse = client.compute_loss("sparse_categorical_cross_entropy", data["logits"],
                                 data["labels"], from_logits=True, label_smoothing=0.1,
                                 ignore_index=-100, class_weight=[1.0, 0.5, 2.0, 1.0])
    assert triton_run["results"]["sparse_outputs"] == ["LOSS"]
    assert out["sparse_loss"][0] == sparse.loss


@pytest.mark.parametrize(("case", "status", "names"), [
    ("unknown model", "StatusCode.NOT_FOUND", "model_name: unknown model 'nope'"),
    ("metadata of an unknown model", "StatusCode.NOT_FOUND", "model_name"),
    ("missing input", "StatusCode.INVALID_ARGUMENT", "TARGETS: required input"),
    ("wrong datatype", "StatusCode.INVALID_ARGUMENT", "PREDICTIONS.dtype: int32"),
    ("bad parameter", "StatusCode.INVALID_ARGUMENT", "parameters.delta: -1.0 is outside"),
    ("shape mismatch", "StatusCode.INVALID_ARGUMENT", "TARGETS.shape: (3, 6) must equal"),
    ("unimplemented", "StatusCode.UNIMPLEMENTED", ""),
])
def test_tritonclient_reports_the_documented_status(triton_run: dict[str, Any], case: str,
                                                    status: str, names: str) -> None:
    error = triton_run["results"]["errors"][case]
    assert error["status"] == status, error
    assert names in error["message"], error


def test_readme_example_runs(tritonclient_python: Path, server_address: str) -> None:
    section = README.read_text().split("## Open Inference Protocol", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    code = block.group(1).replace("127.0.0.1:50051", server_address)
    done = _run(tritonclient_python, ["-c", code + "print(repr(loss), gradient.shape, "
                                      "gradient.dtype)\n"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.fullmatch(r"np\.float64\(0\.\d+\) \(8, 3\) float32\n", done.stdout), done.stdout
