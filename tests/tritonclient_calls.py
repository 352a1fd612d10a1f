"""Calls to lossgrad through tritonclient (run in tritonclient's own environment by
``test_kserve_tritonclient.py``, since tritonclient needs protobuf < 7).

``python tritonclient_calls.py ADDRESS OUT_DIR`` reads ``OUT_DIR/inputs.npz``, makes the
calls, and writes ``OUT_DIR/outputs.npz`` (the output arrays) and ``OUT_DIR/results.json``
(readiness, metadata and, for each bad request, the status and message tritonclient
reports). Only tritonclient's public API is used, as a user would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def _inputs(**arrays: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _error(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as err:
        return {"status": str(err.status()), "message": str(err.message())}
    return {"status": "OK", "message": ""}


def main(address: str, out_dir: Path) -> None:
    data = dict(np.load(out_dir / "inputs.npz"))
    client = grpcclient.InferenceServerClient(address)
    results: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "model_ready": {name: client.is_model_ready(name) for name in ("mse", "l2", "nope")},
        "metadata": client.get_model_metadata("huber", as_json=True),
        "config": client.get_model_config("mse", as_json=True),
    }
    outputs: dict[str, np.ndarray] = {}

    mse = client.infer("mse", _inputs(PREDICTIONS=data["x"], TARGETS=data["y"],
                                      SAMPLE_WEIGHT=data["w"]), request_id="tc-1")
    results["mse_id"] = mse.get_response().id
    outputs["mse_loss"], outputs["mse_gradient"] = mse.as_numpy("LOSS"), mse.as_numpy("GRADIENT")

    huber = client.infer("huber", _inputs(PREDICTIONS=data["x64"], TARGETS=data["y64"]),
                         parameters={"delta": 0.5, "reduction": "none"})
    outputs["huber_loss"] = huber.as_numpy("LOSS")
    outputs["huber_gradient"] = huber.as_numpy("GRADIENT")

    sparse = client.infer(
        "sparse_categorical_cross_entropy", _inputs(PREDICTIONS=data["logits"],
                                                    TARGETS=data["labels"]),
        outputs=[grpcclient.InferRequestedOutput("LOSS")],
        parameters={"from_logits": True, "label_smoothing": 0.1, "ignore_index": -100,
                    "class_weight": "[1.0, 0.5, 2.0, 1.0]"})
    results["sparse_outputs"] = [o.name for o in sparse.get_response().outputs]
    outputs["sparse_loss"] = sparse.as_numpy("LOSS")

    xy = _inputs(PREDICTIONS=data["x"], TARGETS=data["y"])
    results["errors"] = {
        "unknown model": _error(lambda: client.infer("nope", xy)),
        "metadata of an unknown model": _error(lambda: client.get_model_metadata("nope")),
        "missing input": _error(lambda: client.infer("mse", xy[:1])),
        "wrong datatype": _error(lambda: client.infer(
            "mse", _inputs(PREDICTIONS=data["x"].astype(np.int32), TARGETS=data["y"]))),
        "bad parameter": _error(lambda: client.infer("huber", xy, parameters={"delta": -1.0})),
        "shape mismatch": _error(lambda: client.infer(
            "mse", _inputs(PREDICTIONS=data["x"], TARGETS=data["y"][:3]))),
        "unimplemented": _error(lambda: client.get_model_repository_index()),
    }
    np.savez(out_dir / "outputs.npz", **outputs)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    client.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
