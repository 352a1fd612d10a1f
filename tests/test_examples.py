"""Each example in examples/ trains over the network against a real server and learns.

The examples run as their own processes, as a user runs them, with the session server's
address as their argument; each exits non-zero when its model did not learn, which a run
with no training steps checks (for the NumPy example: a PyTorch process takes seconds to
start, and the check is the same few lines).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# example file -> the thresholds its run prints
LEARNED = {
    "torch_training.py": "(target < 0.1), accuracy",
    "numpy_logistic_regression.py": "(target < 0.35), accuracy",
    "xgboost_remote_objective.py": "(target < 0.3), accuracy",
}


def _run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_example_learns(server_address: str, name: str) -> None:
    done = _run(name, server_address)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith("learned: final loss") and LEARNED[name] in last, last
    losses = [float(value) for value in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 2, losses


def test_example_without_training_fails_its_check(server_address: str) -> None:
    done = _run("numpy_logistic_regression.py", server_address, "--steps", "0")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("did not learn: final loss 0.6931")


def test_large_logits_streams_with_a_progress_bar(server_address: str) -> None:
    """Small logits, forced through ComputeStream in many chunks, the bar drawn at once:
    a bar per call on stderr ending at 100%, and the step on the logits lowers the loss."""
    done = _run("large_logits.py", server_address, "--batch", "2", "--sequence", "48",
                "--vocabulary", "500", "--stream", "--chunk-bytes", "20000",
                "--bar-after", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("learned: final loss"), done.stdout
    # Read in text mode, each redraw ("\r" + the bar) is a line of its own.
    bars = [line for line in done.stderr.splitlines() if line]
    last = {bar.split(" [")[0]: bar for bar in bars}
    assert list(last) == ["gradient", "loss"], done.stderr
    assert all("] 100% " in bar for bar in last.values()), done.stderr
    assert len(bars) > 2 * 5  # drawn chunk by chunk


def test_every_example_is_listed() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLES.glob("*.py"):
        assert f"`{path.name}`" in readme, path.name
