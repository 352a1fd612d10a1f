"""A language model's logits, too large for one gRPC message, streamed with a progress bar.

    python examples/large_logits.py [ADDRESS] [--batch 2 --sequence 2048 --vocabulary 32000]

ADDRESS defaults to $LOSSGRAD_ADDRESS, then 127.0.0.1:50051.

The default logits, (2, 2048, 32000) float32, are 500 MiB: past the 256 MiB message limit,
so ``compute_gradient`` goes by the ComputeStream RPC by itself, in chunks, and writes the
gradient into an array the worker allocated once (``out=``). ``progress`` draws a bar on
stderr once a transfer has taken more than ``--bar-after`` seconds. The logits are random
normal (the loss starts near log(vocabulary) + 1/2) and 10% of the labels are padding
(``ignore_index=-100``). One gradient step on the logits themselves must lower the loss:
exits 1 unless the final loss is below the first by ``MIN_DECREASE``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import numpy as np
from lossgrad_client import LossClient

IGNORE_INDEX = -100
STEP = 1.0  # per position: the MEAN's gradient is divided by the positions counted
MIN_DECREASE = 0.01


def progress_bar(label: str, after_s: float = 0.5, width: int = 30,
                 out: TextIO = sys.stderr) -> Callable[[int, int], None]:
    """A ``progress(sent, total)`` callback that draws ``label [#####-----] 50% ...`` on
    ``out`` once ``after_s`` seconds have passed, and ends the line at 100%: a quick
    transfer prints nothing."""
    start = time.perf_counter()
    drawn = [False]

    def progress(sent: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        if elapsed < after_s and not drawn[0]:
            return
        drawn[0] = True
        done = sent / total if total else 1.0
        filled = int(done * width)
        rate = sent / 2**20 / max(elapsed, 1e-9)
        out.write(f"\r{label} [{'#' * filled}{'-' * (width - filled)}] {done:4.0%} "
                  f"{sent / 2**20:.1f}/{total / 2**20:.1f} MiB, {rate:.1f} MiB/s")
        if sent >= total:
            out.write("\n")
        out.flush()

    return progress


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?",
                        default=os.environ.get("LOSSGRAD_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sequence", type=int, default=2048)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--bar-after", type=float, default=0.5,
                        help="seconds before a transfer shows its bar (default %(default)s)")
    parser.add_argument("--chunk-bytes", type=int, default=16 * 2**20,
                        help="bytes per streamed chunk (default %(default)s)")
    parser.add_argument("--stream", action="store_true",
                        help="stream even tensors that fit one message")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.sequence, args.vocabulary)
    logits = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, args.vocabulary, shape[:2])
    labels[rng.random(shape[:2]) < 0.1] = IGNORE_INDEX
    grad = np.empty_like(logits)  # the one gradient buffer, reused by every call
    params = {"from_logits": True, "ignore_index": IGNORE_INDEX}
    print(f"logits {'x'.join(map(str, shape))} float32: {logits.nbytes / 2**20:.0f} MiB")

    with LossClient(args.address, timeout=600.0, stream_chunk_bytes=args.chunk_bytes) as client:
        start = time.perf_counter()
        result = client.compute_gradient(
            "sparse_categorical_cross_entropy", logits, labels, out=grad,
            stream=args.stream or None, progress=progress_bar("gradient", args.bar_after),
            **params)
        seconds = time.perf_counter() - start
        print(f"loss {result.loss:.4f} over {result.positions_counted} positions "
              f"(log {args.vocabulary} = {math.log(args.vocabulary):.4f}), in {seconds:.2f} s")
        # A step on the logits, in place: dL/dlogits is divided by the positions counted.
        grad *= STEP * result.positions_counted
        logits -= grad
        final = client.compute_loss("sparse_categorical_cross_entropy", logits, labels,
                                    stream=args.stream or None,
                                    progress=progress_bar("loss", args.bar_after),
                                    **params).loss

    learned = final < result.loss - MIN_DECREASE
    print(f"{'learned' if learned else 'did not learn'}: final loss {final:.4f} "
          f"(target < first {result.loss:.4f} - {MIN_DECREASE})")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
