#!/usr/bin/env python3
"""Per-operation time of a decode step: each quantized matrix and the routed experts.

    python scripts/profile_decode.py models/k2-scale-1L.gguf --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hybrid_runtime as hr  # noqa: E402
from hybrid_runtime.experts import backends  # noqa: E402
from hybrid_runtime.weights import provider  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    m = hr.load(a.model, threads=a.threads)
    spent: dict[tuple, float] = defaultdict(float)
    keys = {provider.KernelLinear: lambda s: (s.ggml_type.name, tuple(s.raw.shape), s.raw.nbytes),
            provider.KernelHeadLinear: lambda s: ("per-head " + s.spec.qtype.name, tuple(s.raw.shape), s.raw.nbytes),
            backends.CpuQuantExperts: lambda s: ("routed experts", (), 0)}
    for cls, key in keys.items():
        orig = cls.__call__

        def timed(self, *args, _orig=orig, _key=key):
            t0 = time.perf_counter()
            out = _orig(self, *args)
            spent[_key(self)] += time.perf_counter() - t0
            return out

        cls.__call__ = timed
    cache = m.new_cache()
    m.forward(list(range(16)), cache)
    for _ in range(3):
        m.forward([5], cache)
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        m.forward([5], cache)
    step = (time.perf_counter() - t0) / a.steps
    inside = sum(spent.values()) / a.steps
    print(f"step {step * 1e3:.2f} ms, inside kernels {inside * 1e3:.2f} ms, outside {(step - inside) * 1e3:.2f} ms")
    for (name, shape, nbytes), s in sorted(spent.items(), key=lambda kv: -kv[1]):
        ms = s / a.steps * 1e3
        print(f"  {name:16s} {str(shape):20s} {ms:7.2f} ms" + (f"  {nbytes / (ms / 1e3) / 1e9:6.1f} GB/s per matrix" if nbytes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
