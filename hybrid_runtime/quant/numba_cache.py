"""Key Numba's on-disk cache on the kernel sources.

Numba invalidates a cached function only when its own file changes; kernels.py's compiled code
also depends on vnni.py and q8k.py. Unless the user chose NUMBA_CACHE_DIR, the cache goes to a
directory named by a hash of all kernel sources, so any edit or upgrade recompiles.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hybrid_runtime.quant.cpu_features import PREFETCH_ENV

_SOURCES = ("quant/kernels.py", "quant/vnni.py", "quant/q8k.py", "quant/cpu_features.py",
            "quant/floatbits.py", "quant/bf16.py", "quant/act_quant.py", "quant/gemm.py", "quant/panels.py", "cpu/table.py", "cpu/rows.py",
            "cpu/layers.py")


def use_versioned_cache_dir() -> None:
    import numba

    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:
        return
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        p = root / rel
        h.update(p.read_bytes() if p.exists() else b"")
    h.update(os.environ.get(PREFETCH_ENV, "").encode())  # compiled into the row kernels
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybrid_runtime"
    target = base / f"numba-{h.hexdigest()[:16]}"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: Numba falls back to __pycache__
    numba.config.CACHE_DIR = str(target)
