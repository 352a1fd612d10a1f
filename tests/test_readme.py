"""The README's worker example runs as written against a real server and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_worker_example_trains(server_address: str) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = block.group(1).replace("127.0.0.1:50051", server_address)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) == 5
    assert losses[0] > 1.6 and losses[-1] < 0.6  # log(5) = 1.609 at zero weights
    assert "rejected: INVALID_ARGUMENT: params.delta" in done.stdout
