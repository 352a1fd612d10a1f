"""numba kernels, one module per loss family, run by the drivers in ``drivers.py``.

numba's on-disk cache only notices edits to the file that defines a function, not to
the helpers it inlines from other files. The cache therefore lives in a directory named
after a hash of every kernel source, so a changed helper can never load stale machine
code. ``NUMBA_CACHE_DIR`` (e.g. a writable emptyDir in a container) moves its root.
"""

from __future__ import annotations

import hashlib
import os
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


def _configure() -> None:
    root = os.environ.get("NUMBA_CACHE_DIR") or str(Path(__file__).parent / "__pycache__")
    numba.config.CACHE_DIR = os.path.join(root, f"lossgrad-{_source_hash()}")
    # The loss and math helpers are small numba functions that must be inlined into the
    # kernels' loops for those loops to vectorise; LLVM's default threshold keeps the
    # larger ones (log, softplus) as calls. Only compilation reads this option.
    llvm.set_option("lossgrad", f"-inline-threshold={INLINE_THRESHOLD}")
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # gRPC calls kernels from several threads at once: workqueue would abort.
        numba.config.THREADING_LAYER = "threadsafe"


_configure()
