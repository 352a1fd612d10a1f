"""The Node.js client (client/node) against a real server: same numbers as the Python client.

The requests are built here, sent by ``node client/node/compute-json.js`` and by
``LossClient``, and every loss, count and gradient must be equal bit for bit. Needs
``node`` and ``npm`` on PATH; installs the locked dependencies (``npm ci``) when
``client/node/node_modules`` does not hold them.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lossgrad_client import InvalidArgumentError, LossClient

NODE_DIR = Path(__file__).resolve().parent.parent / "client" / "node"
NPM_CI_TIMEOUT_S = 300
NODE_TIMEOUT_S = 120

pytestmark = pytest.mark.e2e


def _encode(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes())
            .decode("ascii")}


def _decode(value: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(value["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(value["data"]), dtype=dtype).reshape(value["shape"])


def _requests() -> list[dict[str, Any]]:
    """The cases: each loss family, both float dtypes, int64 and int32 class indices,
    parameters, sample weights, the three reductions, and one invalid request."""
    rng = np.random.default_rng(5)
    values64 = rng.normal(size=(8, 3))
    targets64 = rng.normal(size=(8, 3))
    logits32 = rng.normal(scale=3.0, size=(16, 5)).astype(np.float32)
    labels64 = rng.integers(0, 5, size=16, dtype=np.int64)
    return [
        {"method": "computeLoss", "loss": "mse", "predictions": _encode(values64),
         "targets": _encode(targets64)},
        {"method": "computeGradient", "loss": "mse",
         "predictions": _encode(values64.astype(np.float32)),
         "targets": _encode(targets64.astype(np.float32)), "reduction": "sum",
         "sample_weight": _encode(rng.uniform(0.0, 2.0, size=8).astype(np.float32))},
        {"method": "computeGradient", "loss": "sparse_categorical_cross_entropy",
         "predictions": _encode(logits32), "targets": _encode(labels64),
         "params": {"from_logits": True, "label_smoothing": 0.1, "ignore_index": 2,
                    "class_weight": [1.0, 0.5, 2.0, 1.5, 0.25]}},
        {"method": "computeLoss", "loss": "sparse_categorical_cross_entropy",
         "predictions": _encode(logits32.astype(np.float64)),
         "targets": _encode(labels64.astype(np.int32)), "params": {"from_logits": True}},
        {"method": "computeGradient", "loss": "huber", "predictions": _encode(values64),
         "targets": _encode(targets64), "reduction": "none", "params": {"delta": 0.5}},
        {"method": "computeLoss", "loss": "huber", "predictions": _encode(values64),
         "targets": _encode(targets64), "params": {"delta": -1.0}},
    ]


def _python_result(client: LossClient, request: dict[str, Any]) -> dict[str, Any]:
    """What compute-json.js prints for ``request``, computed with the Python client."""
    kwargs = dict(request.get("params", {}))
    if "sample_weight" in request:
        kwargs["sample_weight"] = _decode(request["sample_weight"])
    method = client.compute_gradient if request["method"] == "computeGradient" \
        else client.compute_loss
    try:
        result = method(request["loss"], _decode(request["predictions"]),
                        _decode(request["targets"]),
                        reduction=request.get("reduction", "mean"), **kwargs)
    except InvalidArgumentError as err:
        return {"error": {"code": err.code.value[0], "details": err.message}}
    out = {
        "loss": result.loss if isinstance(result.loss, float) else _encode(result.loss),
        "positions": result.positions,
        "positions_counted": result.positions_counted,
        "weight_sum": result.weight_sum,
    }
    if hasattr(result, "gradient"):
        out["gradient"] = _encode(result.gradient)
    return out


def _node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed on PATH for the Node.js client test")
    return node, npm


def _installed(package: dict[str, Any]) -> bool:
    """True when node_modules holds the exact versions that package.json pins."""
    for name, version in package["dependencies"].items():
        manifest = NODE_DIR / "node_modules" / name / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with client/node's locked dependencies installed."""
    return node_with_dependencies()


def node_with_dependencies() -> str:
    """The node executable, after ``npm ci`` in client/node unless node_modules holds the
    pinned versions (skips the test when node or npm is missing)."""
    node, npm = _node_tools()
    package = json.loads((NODE_DIR / "package.json").read_text())
    if not _installed(package):
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return node


def test_package_pins_exact_versions_and_lockfile_agrees() -> None:
    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned exactly: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


def run_both(node: str, address: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``requests`` with compute-json.js and with LossClient to ``address``; assert
    the results are equal and return Node's."""
    done = subprocess.run([node, str(NODE_DIR / "compute-json.js"), address],
                          input=json.dumps(requests), capture_output=True, text=True,
                          timeout=NODE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    from_node: list[dict[str, Any]] = json.loads(done.stdout)
    assert len(from_node) == len(requests)
    with LossClient(address, timeout=60.0) as client:
        for request, node_result in zip(requests, from_node, strict=True):
            expected = _python_result(client, request)
            # Floats compare exactly (JSON carries the shortest repr that round-trips),
            # tensors by their bytes.
            assert node_result == expected, (request["method"], request["loss"])
    return from_node


def test_node_client_matches_python_client(node: str, server_address: str) -> None:
    from_node = run_both(node, server_address, _requests())
    assert from_node[-1]["error"]["code"] == 3  # INVALID_ARGUMENT
    assert "delta" in from_node[-1]["error"]["details"]
