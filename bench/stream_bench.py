"""Section 6: a language model's logits through ComputeStream, and the memory it takes.

Runs as a child of ``bench/run.py`` (the client's peak memory is this process's own):

    python bench/stream_bench.py --shape 8x2048x32000 [--quick] --out RESULT.json

writes ``{"markdown": ..., "problems": [...]}``. For each chunk size a fresh
``lossgrad serve`` runs the sparse cross-entropy (from logits, ``ignore_index``, MEAN,
gradient) of float32 logits of ``--shape`` and int64 labels; the gradient is written into
one preallocated array (``out=``), as a worker would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lossgrad
import numpy as np
from cases import SEED
from lossgrad_client import LossClient
from measure import Timing, fmt_ms, fmt_ratio, table
from servers import MALLOC_ENV, ServerProcess, lossgrad_command, max_workers

LOSS = "sparse_categorical_cross_entropy"
PARAMS: dict[str, Any] = {"from_logits": True, "ignore_index": -100}
PADDING = 0.1  # share of positions labelled ignore_index
MIB = 1024 * 1024
GB = 1e9
CALL_TIMEOUT_S = 600.0
FULL_SHAPE = (8, 2048, 32000)  # 2 GiB of float32 logits: past protobuf's 2 GiB cap
QUICK_SHAPE = (1, 1024, 32000)
CHUNKS_MIB = {False: (4, 16, 64), True: (4, 16)}  # by --quick
CALLS = {False: 3, True: 2}  # timed calls per chunk size, after one untimed


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"8x2048x32000"`` -> (8, 2048, 32000)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQUENCExVOCABULARY, got {text!r}")
    batch, seq, vocab = (int(p) for p in parts)
    return batch, seq, vocab


def shape_label(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def _inputs(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    logits = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, shape[2], shape[:2], dtype=np.int64)
    labels[rng.random(shape[:2]) < PADDING] = PARAMS["ignore_index"]
    return logits, labels


def _own_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Restart this process's ``VmHWM`` from its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _measure(chunk: int, logits: np.ndarray, labels: np.ndarray, grad: np.ndarray,
             calls: int) -> tuple[Any, Timing, int, int, int, int]:
    """One fresh server: (result, call times, messages and tensor bytes sent per call,
    server RSS once ready, server peak)."""
    with ServerProcess(lossgrad_command(max_workers())) as server, \
            LossClient(server.address, timeout=CALL_TIMEOUT_S, stream_chunk_bytes=chunk,
                       options=[("grpc.use_local_subchannel_pool", 1)]) as client:
        base = server.status("VmRSS")
        sent = [0, 0]  # messages and bytes of the last call

        def progress(done: int, total: int) -> None:
            sent[0] += 1
            sent[1] = done

        def call() -> Any:
            sent[:] = [0, 0]
            return client.compute_gradient(LOSS, logits, labels, out=grad, stream=True,
                                           progress=progress, **PARAMS)

        result = call()  # untimed; also the result checked
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return result, Timing(tuple(samples)), sent[0], sent[1], base, server.status("VmHWM")


def run(shape: tuple[int, int, int], quick: bool) -> tuple[str, list[str]]:
    client_start = _own_status("VmRSS")
    logits, labels = _inputs(shape)
    grad = np.empty_like(logits)
    grad.fill(0)  # touched once, so that every call writes into resident pages
    data_bytes = logits.nbytes + labels.nbytes
    held = data_bytes + grad.nbytes
    rows, problems = [], []
    client_peak = 0
    medians: list[float] = []
    streamed: dict[str, Any] = {}
    # Every chunk size on the whole tensor, then the middle one on a quarter of it: the
    # server's peak follows the chunk, not the tensor.
    quarter = max(1, shape[0] * shape[1] // 4)
    runs = [(mib, shape[0] * shape[1]) for mib in CHUNKS_MIB[quick]]
    runs.append((CHUNKS_MIB[quick][1], quarter))
    for chunk_mib, positions in runs:
        chunk = chunk_mib * MIB
        whole = positions == shape[0] * shape[1]
        x = logits if whole else logits.reshape(-1, shape[2])[:positions]
        y = labels if whole else labels.reshape(-1)[:positions]
        out = grad if whole else grad.reshape(-1, shape[2])[:positions]
        resident = _own_status("VmRSS")
        reset = _reset_peak()
        result, timing, messages, sent, base, peak = _measure(chunk, x, y, out, CALLS[quick])
        client_peak = max(client_peak, _own_status("VmHWM"))
        client = _own_status("VmHWM") - resident if reset else float("nan")
        if whole:
            streamed.setdefault("loss", float(result.loss))
            streamed.setdefault("digest", _digest(grad))
            if float(result.loss) != streamed["loss"] or _digest(grad) != streamed["digest"]:
                problems.append(f"stream {chunk_mib} MiB chunks: other bits than "
                                f"{CHUNKS_MIB[quick][0]} MiB chunks")
            medians.append(timing.ms() / 1e3)
        seconds = timing.ms() / 1e3
        label = shape_label(shape) if whole else f"{positions}×{shape[2]}"
        print(f"  stream {label} chunk {chunk_mib} MiB: {seconds:.2f} s, "
              f"server peak {peak / MIB:.0f} MiB", flush=True)
        rows.append([label, f"{x.nbytes / MIB:.0f}", f"{chunk_mib}", str(messages),
                     fmt_ms(timing.ms()), f"{x.nbytes / GB / seconds:.2f}",
                     f"{(sent + out.nbytes) / GB / seconds:.2f}",
                     f"{base / MIB:.0f}", f"{peak / MIB:.0f}", f"{(peak - base) / MIB:.0f}",
                     f"{(peak - base) / chunk:.1f}", f"{client / MIB:.0f}"])
    # The check: the in-process engine's bits. The streamed gradient is hashed and freed
    # first, so the check adds one gradient to the client's memory, not two.
    del grad
    local = lossgrad.compute(LOSS, logits, labels, **PARAMS)
    assert local.gradient is not None
    same = float(local.loss) == streamed["loss"] and _digest(local.gradient) == streamed["digest"]
    del local
    if not same:
        problems.append(f"stream {shape_label(shape)}: loss or gradient differs from "
                        "in-process lossgrad.compute")
    samples = []
    for _ in range(CALLS[quick]):  # each call's gradient is freed before the next
        start = time.perf_counter()
        lossgrad.compute(LOSS, logits, labels, **PARAMS)
        samples.append(time.perf_counter() - start)
    local_s = Timing(tuple(samples)).ms() / 1e3
    header = ["logits", "logits MiB", "chunk MiB", "messages (both passes)",
              "call ms (median)", "logits GB/s", "sent + received GB/s",
              "server RSS at start MiB", "server peak MiB",
              "server peak − start MiB", "(peak − start) / chunk",
              "client peak − resident MiB"]
    fastest = min(medians)
    summary = (
        f"\nLogits {shape_label(shape)} float32 ({logits.nbytes / MIB:.0f} MiB) with int64 "
        f"labels ({labels.nbytes / MIB:.0f} MiB), {PADDING:.0%} of them `ignore_index`: "
        f"the request is {data_bytes / MIB:.0f} MiB plus the labels again in the weight "
        f"pass, the gradient {logits.nbytes / MIB:.0f} MiB. "
        f"**Client peak RSS** (`VmHWM` of this process over every call): "
        f"{client_peak / MIB:.0f} MiB, of which {held / MIB:.0f} MiB are the logits, labels "
        f"and gradient it holds and {client_start / MIB:.0f} MiB were resident before "
        f"them: {(client_peak - client_start - held) / MIB:.0f} MiB beyond its own arrays. "
        f"In-process `lossgrad.compute` on the same arrays (median of as many calls after "
        f"one): {local_s * 1e3:.0f} ms "
        f"(the fastest stream takes {fmt_ratio(fastest / local_s)} as long). "
        f"Same bits as in-process (loss and gradient SHA-256, every chunk size): "
        f"{'yes' if same else '**NO**'}.\n")
    return table(header, rows) + summary, problems


NOTE = """\
The case the stream is for: a language model's output, float32 logits (batch, sequence,
vocabulary) and int64 labels, `compute_gradient("{loss}", logits, labels, from_logits=True,
ignore_index=-100, out=grad, stream=True)` through `LossClient(stream_chunk_bytes=...)`
against `lossgrad serve --max-workers {workers}` (default 256 MiB message limit) in a
subprocess on 127.0.0.1, a fresh server per chunk size. The MEAN over the positions not
ignored needs its divisor before the first gradient element, so each call sends the labels
once first (the weight pass), then logits and labels. Median of {calls} calls after one
untimed call. *logits GB/s*: logits bytes / call time; *sent + received*: every tensor
byte both ways (both passes, and the gradient). Server memory from `/proc/PID/status`:
`VmRSS` once ready, `VmHWM` after the calls; the client's peak per row is its `VmHWM`
(restarted before the row through `/proc/self/clear_refs`) less its RSS before it. The
last row runs the middle chunk size on a quarter of the positions (the logits as a 2-D
(positions, vocabulary) view): the server's peak follows the chunk, not the tensor. The
client and the server run with {malloc}, as the README advises for workers that send large tensors.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=None,
                        help="BATCHxSEQUENCExVOCABULARY (default "
                             f"{shape_label(FULL_SHAPE)}, {shape_label(QUICK_SHAPE)} with "
                             "--quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shape = args.shape or (QUICK_SHAPE if args.quick else FULL_SHAPE)
    markdown, problems = run(shape, args.quick)
    note = NOTE.format(loss=LOSS, workers=max_workers(), calls=CALLS[args.quick],
                       malloc=" ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
    args.out.write_text(json.dumps({"markdown": note + "\n" + markdown,
                                    "problems": problems}))


if __name__ == "__main__":
    main()
