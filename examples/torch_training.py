"""Train a small PyTorch classifier whose loss and gradient come from a lossgrad server.

    python examples/torch_training.py [ADDRESS]

ADDRESS defaults to $LOSSGRAD_ADDRESS, then 127.0.0.1:50051.

The data are synthetic: 2-D points whose class (one of 3) is the angular sector they lie
in, which a linear model cannot separate. ``RemoteLoss`` is an ordinary ``nn.Module``:
its forward makes one ComputeGradient call, and ``loss.backward()`` sends the server's
gradient through the network. Exits 1 unless the cross entropy falls below
``TARGET_LOSS`` (it starts near log 3 = 1.10) and the training accuracy passes
``TARGET_ACCURACY``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from lossgrad_client import LossClient
from lossgrad_client.torch import RemoteLoss

TARGET_LOSS = 0.1
TARGET_ACCURACY = 0.9


def sectors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points in the unit disc; label = which third of the circle the angle is in."""
    points = torch.rand(n, 2, generator=generator) * 2 - 1
    angle = torch.atan2(points[:, 1], points[:, 0]) + math.pi  # [0, 2 pi]
    labels = torch.clamp((angle / (2 * math.pi / 3)).long(), max=2)
    return points, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?",
                        default=os.environ.get("LOSSGRAD_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features, labels = sectors(512, generator)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)

    with LossClient(args.address, timeout=30.0) as client:
        criterion = RemoteLoss(client, "sparse_categorical_cross_entropy", from_logits=True)
        for step in range(args.steps):
            optimizer.zero_grad()
            loss = criterion(model(features), labels)
            loss.backward()  # the server's gradient w.r.t. the logits, through the model
            optimizer.step()
            if step % 50 == 0:
                print(f"step {step}: loss {loss.item():.4f}")

        with torch.no_grad():  # no gradient wanted: a ComputeLoss call
            logits = model(features)
            final = criterion(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()

    learned = final < TARGET_LOSS and accuracy > TARGET_ACCURACY
    print(f"{'learned' if learned else 'did not learn'}: final loss {final:.4f} "
          f"(target < {TARGET_LOSS}), accuracy {accuracy:.3f} (target > {TARGET_ACCURACY})")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
