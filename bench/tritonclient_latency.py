"""Time tritonclient's ``infer`` on one request (section 8 of bench/run.py). Runs in
tritonclient's own environment (it needs protobuf < 7), so it uses NumPy and
tritonclient only:

    python tritonclient_latency.py ADDRESS MODEL INPUTS.npz OUT.npz BUDGET_S

INPUTS.npz holds ``x`` and ``y``; OUT.npz gets the call times in seconds and the last
call's LOSS and GRADIENT, which the caller compares with the engine's.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

MIN_CALLS, MAX_CALLS = 5, 3000


def main(address: str, model: str, data: str, out: str, budget_s: float) -> None:
    arrays = np.load(data)
    inputs = []
    for name, key in (("PREDICTIONS", "x"), ("TARGETS", "y")):
        array = arrays[key]
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(address)
    result = client.infer(model, inputs)  # warm-up
    seconds: list[float] = []
    while len(seconds) < MAX_CALLS and (len(seconds) < MIN_CALLS or sum(seconds) < budget_s):
        start = time.perf_counter()
        result = client.infer(model, inputs)
        seconds.append(time.perf_counter() - start)
    np.savez(out, seconds=np.array(seconds), loss=result.as_numpy("LOSS"),
             gradient=result.as_numpy("GRADIENT"))
    client.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
