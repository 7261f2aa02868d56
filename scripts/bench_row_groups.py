#!/usr/bin/env python
"""ns per (weight row, activation row) product of the compiled step's row kernels, one row at a
time (`row_dot`) against groups of 4 and 8 activation rows sharing one unpacking of the weight
row (`rows_dot`, what a batched decode step uses for tokens routed to the same expert). One
thread, weights in cache: the compute side alone.

    python scripts/bench_row_groups.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hybrid_runtime.cpu import rows  # noqa: E402
from hybrid_runtime.cpu.step import acts  # noqa: E402
from hybrid_runtime.quant import kernels  # noqa: E402
from hybrid_runtime.quant.cpu_features import has_avx512_vnni  # noqa: E402

_F16_AT = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q8_0: (0,)}


def random_rows(qtype, n_rows, cols, rng):
    values, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_rows, cols // values, nbytes), dtype=np.uint8)
    for off in _F16_AT[qtype]:
        raw[:, :, off:off + 2] = rng.uniform(1e-3, 2e-2, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(
            *raw.shape[:2], 2)
    return raw.reshape(n_rows, -1)


@numba.njit
def _run(flat, rb, n_rows, nb, cols, kind, a, group, reps):
    s = np.float32(0)
    for _ in range(reps):
        for r in range(n_rows):
            if group == 1:
                for p in range(8):
                    s += rows.row_dot(kind, nb, cols, flat, r * rb, a.X, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs, p)
            elif group == 4:
                for p in range(0, 8, 4):
                    y = rows.rows_dot(kind, nb, flat, r * rb, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs,
                                      (p, p + 1, p + 2, p + 3))
                    s += y[0] + y[1] + y[2] + y[3]
            else:
                y8 = rows.rows_dot(kind, nb, flat, r * rb, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs,
                                   (0, 1, 2, 3, 4, 5, 6, 7))
                for i in range(8):
                    s += y8[i]
    return s


def main() -> None:
    if not has_avx512_vnni():
        sys.exit("these kernels need AVX-512 VNNI")
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| weights | row | ns per product: alone | in 4s | in 8s | gain at 8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for qt, cols in [(QT.Q8_0, 2048), (QT.Q4_K, 2048), (QT.Q6_K, 768), (QT.Q4_K, 7168), (QT.Q6_K, 2048)]:
        kind, n_rows = kernels.CPU_KERNELS[qt].kind, 64
        w = random_rows(qt, n_rows, cols, rng)
        a = acts(8, cols)
        a.X[:, :cols] = rng.standard_normal((8, cols))
        rows.quantize_rows(a.X, 8, cols, rows.need_of(kind), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
        nb = cols // GGML_QUANT_SIZES[qt][0]
        ns = {}
        for group in (1, 4, 8):
            _run(w.reshape(-1), w.shape[1], n_rows, nb, cols, kind, a, group, 1)
            reps = max(50, int(4e5 / (n_rows * nb)))
            t = time.perf_counter()
            _run(w.reshape(-1), w.shape[1], n_rows, nb, cols, kind, a, group, reps)
            ns[group] = (time.perf_counter() - t) / (reps * n_rows * 8) * 1e9
        print(f"| {qt.name} | {cols} | {ns[1]:.1f} | {ns[4]:.1f} | {ns[8]:.1f} | {ns[1] / ns[8]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
