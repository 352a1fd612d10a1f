"""``lossgrad_client.tune_allocator``: glibc keeps a freed 64 MiB tensor for the next one.

Each case runs in a fresh interpreter, with the MALLOC_* variables it names and no
others, and counts the page faults of allocating a 64 MiB array a second time: glibc's
defaults give the first one back to the kernel (at least one fault per 2 MiB huge page),
the tuned allocator reuses it (none).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from lossgrad_client import tune_allocator

SECOND_ALLOCATION = """
import resource, sys
import numpy as np
import lossgrad_client
if sys.argv[1] == "tune":
    assert lossgrad_client.tune_allocator(), "mallopt refused"
first = np.ones(1 << 24, np.float32)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = np.ones(1 << 24, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ONE_FAULT_PER_HUGE_PAGE = (64 << 20) // (2 << 20)

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def _faults(mode: str, **malloc_env: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(malloc_env)
    done = subprocess.run([sys.executable, "-c", SECOND_ALLOCATION, mode], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.strip())


def test_glibc_defaults_give_a_freed_tensor_back() -> None:
    assert _faults("plain") >= ONE_FAULT_PER_HUGE_PAGE


def test_tuned_reuses_a_freed_tensor() -> None:
    assert _faults("tune") < ONE_FAULT_PER_HUGE_PAGE // 2


def test_the_environment_takes_precedence() -> None:
    """MALLOC_MMAP_THRESHOLD_ set (here to glibc's own 128 KiB): left as it is."""
    assert _faults("tune", MALLOC_MMAP_THRESHOLD_="131072") >= ONE_FAULT_PER_HUGE_PAGE


def test_arenas_must_be_positive() -> None:
    with pytest.raises(ValueError, match="arenas must be >= 1"):
        tune_allocator(arenas=0)
