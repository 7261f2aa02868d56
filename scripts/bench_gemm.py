#!/usr/bin/env python3
"""The integer panel GEMM (hybrid_runtime/quant/gemm.py) on its own, fresh random weights:

    python scripts/bench_gemm.py [--threads 2] [--stored]

1. the kernel with one panel in cache (1 thread), tiles of 4 / 8 tokens: G multiply-adds/s
   without and with the repack;
2. one matrix x T tokens including the repack and the activation quantization, against the bf16
   route (dequantize to bf16 + torch.matmul through oneDNN) on the same shapes;
3. the routed experts of one medium-12L layer for a 512-token prompt (8 of 64 experts, 768 x
   2048, Q4_K gate/up, Q6_K down): every expert's own weights, then every group on one expert's
   weights (from cache) to show what reading the weights from memory costs.
Never run beside another benchmark: the two cores are shared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.experts.moe_cpu import ExpertWeights, group_by_expert  # noqa: E402
from hybrid_runtime.experts.prefill import _experts_int8  # noqa: E402
from hybrid_runtime.quant import gemm  # noqa: E402
from hybrid_runtime.quant.bf16 import as_bf16, bf16_buffer, dequantize_bf16  # noqa: E402

_SCALES = {QT.Q4_K: (0, 2), QT.Q6_K: (208,), QT.Q8_0: (0,)}


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    values, nbytes = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in _SCALES[qtype]:
        d = rng.uniform(1e-3, 2e-2, (rows, cols // values)).astype(np.float16)
        w[:, :, off: off + 2] = d.view(np.uint8).reshape(rows, cols // values, 2)
    return w.reshape(rows, -1)


def best(fn, n: int = 7) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def kernel_in_cache(rng) -> None:
    numba.set_num_threads(1)
    T, K = 48, 2048
    for qtype in (QT.Q4_K, QT.Q6_K, QT.Q8_0):
        raw = random_blocks(rng, qtype, 16, K)
        acts = gemm.quantize_acts(qtype, rng.standard_normal((T, K)).astype(np.float32))
        y = np.empty((T, 16), np.float32)
        fmt, nb, tok = gemm.GEMM_KINDS[qtype.name], K // 256, np.arange(T, dtype=np.int64)
        panels = gemm.scratch_panels(1, nb)
        reps = 16  # the same panel again: repacked each time, then all T tokens
        run = lambda n: [gemm.gemm_tokens(fmt, raw.reshape(-1), 0, raw.shape[1], 16, nb, *acts, tok[:n], y, 0, panels)
                         for _ in range(reps)]
        run(T)
        t, t_repack = best(lambda: run(T)), best(lambda: run(0))
        mac = 16 * K * T * reps
        print(f"kernel, 1 thread, {qtype.name} 16 x {K} x {T} tokens: {mac / (t - t_repack) / 1e9:.0f} GMAC/s "
              f"({mac / t / 1e9:.0f} with the repack)")


def matrices(rng, threads: int) -> None:
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    for qtype, M, K, T in [(QT.Q4_K, 768, 2048, 64), (QT.Q6_K, 2048, 768, 64), (QT.Q8_0, 2048, 2048, 512),
                           (QT.Q8_0, 3072, 768, 512), (QT.Q4_K, 2048, 7168, 64), (QT.Q6_K, 7168, 2048, 64)]:
        raw = random_blocks(rng, qtype, M, K)
        x = rng.standard_normal((T, K)).astype(np.float32)
        tok, y, flat = np.arange(T, dtype=np.int64), np.empty((T, M), np.float32), raw.reshape(-1)
        ours = lambda: gemm.matmul(qtype, flat, 0, raw.shape[1], M, K, gemm.quantize_acts(qtype, x), tok, y)
        xb, buf = torch.from_numpy(x).to(torch.bfloat16), bf16_buffer("bench", M, K)
        bf16 = lambda: xb @ as_bf16(dequantize_bf16(qtype, raw, buf)).T
        ours(), bf16()
        a, b = best(ours), best(bf16)
        mac = M * K * T
        print(f"{qtype.name} {M} x {K} x {T} tokens, {threads} threads: panel GEMM {mac / a / 1e9:.0f} GMAC/s, "
              f"bf16 + oneDNN {mac / b / 1e9:.0f} GMAC/s ({b / a:.2f}x)")


def experts_layer(rng, threads: int) -> None:
    numba.set_num_threads(threads)
    E, F, D, T, K = 64, 768, 2048, 512, 8
    gate, up = random_blocks(rng, QT.Q4_K, E * F, D), random_blocks(rng, QT.Q4_K, E * F, D)
    down = random_blocks(rng, QT.Q6_K, E * D, F)
    ex = ExpertWeights(gate.reshape(E, F, -1), up.reshape(E, F, -1), down.reshape(E, D, -1), QT.Q4_K, QT.Q4_K,
                       QT.Q6_K, n_expert=E, n_ff=F, hidden=D)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    route = group_by_expert(ids, rng.uniform(0.1, 1, (T, K)).astype(np.float32), E)
    groups = np.arange(len(route.group_expert))
    y = np.empty((len(route.pair_token), D), np.float32)
    mac = len(route.pair_token) * 3 * F * D
    run = lambda: _experts_int8(x, route, groups, ex, y)
    run()
    t = best(run, 5)
    print(f"one layer's experts, {threads} threads ({T} tokens x {K} of {E}): {t * 1e3:.1f} ms, {mac / t / 1e9:.0f} GMAC/s")
    route.group_expert[:] = 0  # every group on expert 0's weights: read from cache
    run()
    t = best(run, 5)
    print(f"  the same, every group on one expert's weights: {t * 1e3:.1f} ms, {mac / t / 1e9:.0f} GMAC/s")


_SHAPES = ((QT.Q4_K, 768, 2048), (QT.Q6_K, 2048, 768), (QT.Q8_0, 2048, 2048))


def stored(rng, threads: int) -> None:
    """Stored panels against work panels repacked per call: 1 thread in cache, then `threads`
    threads over 32 experts rotating (from memory), then one GEMV over 64 K rows."""
    for n_threads, E in ((1, 1), (threads, 32)):
        numba.set_num_threads(n_threads)
        for qtype, M, K in _SHAPES:
            raws = random_blocks(rng, qtype, E * M, K).reshape(E, M, -1)
            sp = gemm.build_stored(raws, qtype)
            for T in (1, 4, 64):
                acts = gemm.quantize_acts(qtype, rng.standard_normal((T, K)).astype(np.float32))
                tok, y, e = np.arange(T), np.empty((T, M), np.float32), [0]

                def one_stored():
                    e[0] = (e[0] + 1) % E
                    gemm.matmul_stored(sp, e[0], acts, tok, y)

                def one_work():
                    e[0] = (e[0] + 1) % E
                    gemm.matmul(qtype, raws.reshape(-1), e[0] * raws[0].size, raws.shape[2], M, K, acts, tok, y)

                ts, tw = best(one_stored, 20), best(one_work, 20)
                print(f"{n_threads} thread(s), {E} expert(s) {qtype.name} {M} x {K}, {T:2d} tokens: stored "
                      f"{M * K * T / ts / 1e9:6.1f} GMAC/s ({raws[0].nbytes / ts / 1e9:5.1f} GB/s of blocks), "
                      f"work {M * K * T / tw / 1e9:6.1f}")
    numba.set_num_threads(threads)
    for qtype, _, K in _SHAPES:
        raw = random_blocks(rng, qtype, 1 << 16, K)
        sp = gemm.build_stored(raw, qtype)
        acts = gemm.quantize_acts(qtype, rng.standard_normal((1, K)).astype(np.float32))
        y = np.empty((1, raw.shape[0]), np.float32)
        t = best(lambda: gemm.matmul_stored(sp, 0, acts, np.zeros(1, np.int64), y), 5)
        print(f"GEMV over {raw.shape[0]} rows of {qtype.name}, {threads} threads: {sp.nbytes / t / 1e9:.1f} GB/s of panels")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stored", action="store_true", help="the stored panels against work panels (and GEMV from memory)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.stored:
        stored(rng, args.threads)
        return 0
    kernel_in_cache(rng)
    matrices(rng, args.threads)
    experts_layer(rng, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
