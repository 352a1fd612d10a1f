"""Plain NumPy logistic regression, its loss and gradient computed by a lossgrad server.

    python examples/numpy_logistic_regression.py [ADDRESS]

ADDRESS defaults to $LOSSGRAD_ADDRESS, then 127.0.0.1:50051.

The worker keeps the model (weights and a bias) and does the linear algebra; the server
computes binary cross entropy on the logits and its gradient w.r.t. them, which the
chain rule takes to the weights: dL/dw = X^T dL/dz, dL/db = sum dL/dz. The data are
synthetic: labels from a random hyperplane, 5% of them flipped. Exits 1 unless the loss
falls below ``TARGET_LOSS`` (it starts at log 2 = 0.693 with zero weights) and the
training accuracy passes ``TARGET_ACCURACY``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from lossgrad_client import LossClient

TARGET_LOSS = 0.35
TARGET_ACCURACY = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?",
                        default=os.environ.get("LOSSGRAD_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 10))
    labels = (features @ rng.normal(size=10) + 0.5 > 0).astype(np.float64)
    flip = rng.random(labels.shape) < 0.05
    labels[flip] = 1.0 - labels[flip]
    weights, bias = np.zeros(10), 0.0

    with LossClient(args.address, timeout=30.0) as client:
        for step in range(args.steps):
            logits = features @ weights + bias
            result = client.compute_gradient("binary_cross_entropy", logits, labels,
                                             from_logits=True)
            # result.gradient is dL/dlogits (already divided by the batch size: "mean")
            weights -= args.learning_rate * (features.T @ result.gradient)
            bias -= args.learning_rate * float(result.gradient.sum())
            if step % 50 == 0:
                print(f"step {step}: loss {result.loss:.4f}")
        logits = features @ weights + bias
        final = client.compute_loss("binary_cross_entropy", logits, labels,
                                    from_logits=True).loss

    accuracy = float(np.mean((logits > 0) == (labels > 0.5)))
    learned = final < TARGET_LOSS and accuracy > TARGET_ACCURACY
    print(f"{'learned' if learned else 'did not learn'}: final loss {final:.4f} "
          f"(target < {TARGET_LOSS}), accuracy {accuracy:.3f} (target > {TARGET_ACCURACY})")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
