"""numba kernels, one module per loss family, run by the drivers in ``drivers.py`` (per
element) and ``rows.py`` (per row).

numba's on-disk cache only notices edits to the file that defines a function, not to
the helpers it inlines from other files. The cache therefore lives in a directory named
after a hash of every kernel source, so a changed helper can never load stale machine
code. ``NUMBA_CACHE_DIR`` (e.g. a writable emptyDir in a container) moves its root.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
from pathlib import Path

import numba
from llvmlite import binding as llvm

INLINE_THRESHOLD = 1500


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{numba.__version__} {INLINE_THRESHOLD}".encode())
    return digest.hexdigest()[:16]


def _load_tbb() -> bool:
    """Load the libtbb of the ``tbb`` wheel, which pip puts in <prefix>/lib, off the
    loader's search path; numba's TBB layer then finds it already loaded."""
    candidates = [
        path
        for prefix in dict.fromkeys((sys.prefix, sys.base_prefix))
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*")))
    ]
    for path in [*candidates, "libtbb.so.12"]:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def cpu_features(host: str, setting: str | None) -> str | None:
    """numba's target features for a host whose LLVM features are ``host``, or None for
    numba's own choice. Where the host has AVX-512, LLVM still prefers 256-bit vectors
    for most Intel CPUs (against the clock drop of older ones); lossgrad asks for 512-bit
    ones, with which the exp/log-heavy element kernels run faster here (BCE with logits
    ~20 % at 1e5-1e6; same bits). ``LOSSGRAD_AVX512=0`` (``setting``) keeps
    LLVM's preference."""
    if setting == "0" or "+avx512f" not in host.split(","):
        return None
    return f"{host},-prefer-256-bit"


def _configure() -> None:
    root = os.environ.get("NUMBA_CACHE_DIR") or str(Path(__file__).parent / "__pycache__")
    numba.config.CACHE_DIR = os.path.join(root, f"lossgrad-{_source_hash()}")
    # The loss and math helpers are small numba functions that must be inlined into the
    # kernels' loops for those loops to vectorise; LLVM's default threshold keeps the
    # larger ones (log, softplus) as calls. Only compilation reads this option.
    llvm.set_option("lossgrad", f"-inline-threshold={INLINE_THRESHOLD}")
    if "NUMBA_CPU_NAME" not in os.environ and "NUMBA_CPU_FEATURES" not in os.environ:
        features = cpu_features(llvm.get_host_cpu_features().flatten(),
                                os.environ.get("LOSSGRAD_AVX512"))
        if features is not None:  # numba's cache keys its machine code on the features
            numba.config.CPU_FEATURES = features
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # gRPC calls kernels from several threads at once (workqueue would abort), and the
        # server's own threads compete for the cores: TBB's work stealing lets the calling
        # thread finish the work of a descheduled worker, where OpenMP's static split
        # waits for it (seen here: 8 ms instead of 2.4 ms with one core busy).
        numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "threadsafe"


_configure()
