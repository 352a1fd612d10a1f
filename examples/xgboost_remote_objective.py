"""XGBoost trained with a custom objective whose gradient and Hessian come from lossgrad.

    python examples/xgboost_remote_objective.py [ADDRESS]

ADDRESS defaults to $LOSSGRAD_ADDRESS, then 127.0.0.1:50051. Needs xgboost (the
client's ``boosting`` extra).

Binary classification on synthetic data (labels from a nonlinear rule, 5% of them
flipped). ``xgboost.train`` gets ``obj=objective(client, "binary_cross_entropy",
from_logits=True)``: each boosting round sends the current margins and labels to the
server once and gets back the per-sample gradient s - y and Hessian max(s (1 - s),
1e-16), s = sigmoid(margin), which is what XGBoost's built-in ``binary:logistic``
computes. The same training with the built-in objective runs beside it, both from a base
margin of 0. Exits 1 unless the log loss falls below ``TARGET_LOSS`` (it starts at
log 2 = 0.693), the accuracy passes ``TARGET_ACCURACY``, and the two models' margins
agree within ``TOLERANCE`` (float32 rounding: XGBoost computes its gradients in float32,
the server in float64).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import xgboost as xgb
from lossgrad_client import LossClient
from lossgrad_client.boosting import objective

TARGET_LOSS = 0.3
TARGET_ACCURACY = 0.9
TOLERANCE = 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?",
                        default=os.environ.get("LOSSGRAD_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 10))
    labels = (features[:, 0] * features[:, 1] + np.sin(2 * features[:, 2]) > 0).astype(float)
    flip = rng.random(labels.shape) < 0.05
    labels[flip] = 1.0 - labels[flip]
    train = xgb.DMatrix(features, labels, base_margin=np.zeros(labels.size))
    params = {"max_depth": 4, "eta": 0.3, "tree_method": "hist", "nthread": 1, "seed": 0}

    with LossClient(args.address, timeout=30.0) as client:
        remote = objective(client, "binary_cross_entropy", from_logits=True)
        model = xgb.train({**params, "disable_default_eval_metric": 1}, train, args.rounds,
                          obj=remote)
        builtin = xgb.train({**params, "objective": "binary:logistic"}, train, args.rounds)
        for done in range(0, args.rounds + 1, 10):
            margins = (model.predict(train, output_margin=True, iteration_range=(0, done))
                       if done else np.zeros(labels.size))  # (0, 0) would mean every round
            loss = client.compute_loss("binary_cross_entropy", margins, labels,
                                       from_logits=True).loss
            print(f"round {done}: loss {loss:.4f}")
        margins = model.predict(train, output_margin=True)
        final = client.compute_loss("binary_cross_entropy", margins, labels,
                                    from_logits=True).loss

    difference = float(np.abs(margins - builtin.predict(train, output_margin=True)).max())
    accuracy = float(np.mean((margins > 0) == (labels > 0.5)))
    learned = final < TARGET_LOSS and accuracy > TARGET_ACCURACY and difference < TOLERANCE
    print(f"{'learned' if learned else 'did not learn'}: final loss {final:.4f} "
          f"(target < {TARGET_LOSS}), accuracy {accuracy:.3f} (target > {TARGET_ACCURACY}), "
          f"{remote.calls} server calls, margins differ from binary:logistic by at most "
          f"{difference:.1e} (target < {TOLERANCE:g})")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
