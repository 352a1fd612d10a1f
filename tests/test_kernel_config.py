"""How lossgrad configures numba before the first kernel compiles: the target features."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llvmlite import binding as llvm
from lossgrad.kernels import cpu_features

HOST = "+sse2,+avx2,+fma,+avx512f,+avx512bw,-amx-tile"


def test_avx512_hosts_ask_for_512_bit_vectors():
    assert cpu_features(HOST, None) == HOST + ",-prefer-256-bit"
    assert cpu_features(HOST, "1") == HOST + ",-prefer-256-bit"


@pytest.mark.parametrize(("host", "setting"), [
    (HOST, "0"),  # LOSSGRAD_AVX512=0 keeps LLVM's preference
    ("+sse2,+avx2,+fma", None),  # no AVX-512
    ("+sse2,+avx2,-avx512f,+avx512fp16", None),  # only the exact feature counts
])
def test_numba_keeps_its_own_choice(host, setting):
    assert cpu_features(host, setting) is None


def _features_in_child(**env: str) -> str:
    code = ("import numba, lossgrad.kernels; "
            "print(numba.config.CPU_FEATURES)")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "LOSSGRAD_AVX512")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.strip()


def test_the_process_setting_follows_the_host_and_the_environment():
    host = llvm.get_host_cpu_features().flatten()
    want = cpu_features(host, None)
    assert _features_in_child() == str(want)
    assert _features_in_child(LOSSGRAD_AVX512="0") == "None"
    # numba's own variables win: lossgrad leaves them as they are.
    assert _features_in_child(NUMBA_CPU_FEATURES="+avx2") == "+avx2"
