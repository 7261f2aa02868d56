"""Decode speed against context depth (as llama-bench's depth option or ik_llama.cpp's sweep-bench):
at each depth d, the median step of n_gen decode steps after d tokens, ours and llama.cpp's.

Our cache is filled to depth d with random latents (the values do not change the work of a step;
a real prefill of 16K tokens would dominate the run); llama.cpp prefills d tokens for real.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from hybrid_runtime.oracle import open_llama
from hybrid_runtime.util import quiet_stderr


def _fill(model, cache, depth: int, rng) -> None:
    """A cache at `depth` tokens: compiled caches get random rows, others a real prefill."""
    if depth == 0:
        return
    if hasattr(cache, "reserve"):
        cache.reserve(depth)
        pool, rows = cache.pool, cache.rows(0, depth)
        pool.lat[:, rows] = rng.standard_normal(pool.lat[:, rows].shape, dtype=np.float32)
        pool.pe[:, rows] = rng.standard_normal(pool.pe[:, rows].shape, dtype=np.float32)
        cache.commit(depth)
    else:
        toks = rng.integers(0, min(model.n_vocab, 2000), depth).tolist()
        model.forward(toks, cache)


def ours_at_depth(model, depth: int, n_gen: int) -> float:
    rng = np.random.default_rng(0)
    cache = model.new_cache()
    _fill(model, cache, depth, rng)
    token = 100
    model.forward([token], cache)  # warm-up
    times = []
    for _ in range(n_gen):
        t0 = time.perf_counter()
        model.forward([token], cache)
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times))


def llama_at_depth(path, threads: int, depth: int, n_gen: int, betas) -> float:
    llm = open_llama(path, n_ctx=depth + n_gen + 16, threads=threads, yarn_betas=betas, f32_kv=False,
                     logits_all=False)
    try:
        with quiet_stderr():
            if depth:
                llm.eval(np.random.default_rng(0).integers(0, min(llm.n_vocab(), 2000), depth).tolist())
            llm.eval([100])
            times = []
            for _ in range(n_gen):
                t0 = time.perf_counter()
                llm.eval([100])
                times.append(time.perf_counter() - t0)
        return 1.0 / float(np.median(times))
    finally:
        llm.close()
        gc.collect()


def sweep(path, threads: int, depths: list[int], n_gen: int = 16, compare: bool = True) -> dict:
    import hybrid_runtime as hr

    model = hr.load(path, threads=threads, n_ctx=max(depths) + n_gen + 16)
    rows = [{"depth": d, "ours_tps": ours_at_depth(model, d, n_gen)} for d in depths]
    betas = model.yarn_betas
    del model
    gc.collect()
    if compare:
        for r in rows:
            r["llama_cpp_tps"] = llama_at_depth(path, threads, r["depth"], n_gen, betas)
            r["ratio"] = r["ours_tps"] / r["llama_cpp_tps"]
    return {"model": str(path), "threads": threads, "n_gen": n_gen, "rows": rows}


def plot_sweep(result: dict, out) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["depth"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(d, [r["ours_tps"] for r in result["rows"]], "o-", label="hybrid_runtime")
    if "llama_cpp_tps" in result["rows"][0]:
        ax.plot(d, [r["llama_cpp_tps"] for r in result["rows"]], "s--", label="llama.cpp")
    ax.set_xscale("symlog", linthresh=1024)
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode vs depth, {result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return str(out)
