"""The GPU path against the CPU path on one file: agreement, decode/prefill tokens/s, cache hits.

Configurations (each loaded fresh, the same prompt for all):
  cpu          every weight on the CPU (the reference for agreement and speed)
  gpu, cache off   attention/shared/router on the GPU, routed experts on the CPU (--cpu-moe)
  gpu, cache on    the default plan: leftover VRAM as hot-expert slots
  gpu, cache on, graphs   the same with --cuda-graphs

Prefill runs one chunk of n_prompt tokens, so a large enough chunk takes the layerwise offload
(the ring's counters say how many experts were uploaded and how many were ready in advance).
`stand_in="cpu"` runs the GPU code path with torch on the CPU (CI smoke test; no timing meaning).
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from hybrid_runtime.api import load
from hybrid_runtime.bench.e2e import _tokens

CONFIGS = {
    "cpu": {"device": "cpu"},
    "gpu, cache off": {"device": "cuda", "cpu_moe": True},
    "gpu, cache on": {"device": "cuda"},
    "gpu, cache on, graphs": {"device": "cuda", "cuda_graphs": True},
}


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run(model, prompt: list[int], n_gen: int) -> dict:
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache, all_logits=True)
    prefill_s = time.perf_counter() - t0
    token = int(np.argmax(logits[-1]))
    times = []
    for _ in range(n_gen):
        t0 = time.perf_counter()
        token = int(np.argmax(model.forward([token], cache)[-1]))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times[1:] if len(times) > 1 else times))
    return {"logits": logits, "prefill_tps": len(prompt) / prefill_s, "decode_tps": 1.0 / step}


def _counters(model) -> dict:
    w = model.net_weights
    out = {}
    cache, stream = getattr(w, "cache", None), getattr(w, "stream", None)
    if cache is not None:
        c = cache.counters
        out.update(cache_slots=cache.n_slots, hit_rate=c.hit_rate, copies=c.copies, evictions=c.evictions)
    if stream is not None:
        c = stream.counters
        out.update(ring_uploads=c.uploads, ring_ready_at_begin=c.ready_at_begin, ring_wasted=c.wasted_uploads)
    return out


def bench_gpu(path, threads: int | None = None, n_prompt: int = 512, n_gen: int = 32, seed: int = 0,
              stand_in: str | None = None, configs: list[str] | None = None) -> dict:
    """{config: {prefill_tps, decode_tps, rel_l2_vs_cpu, top1_vs_cpu, ...counters}}."""
    names = configs or list(CONFIGS)
    prompt = _tokens(n_prompt, 2000, seed)
    rows, ref = {}, None
    for name in ["cpu"] + [n for n in names if n != "cpu"]:
        opts = dict(CONFIGS[name], threads=threads)
        if stand_in and opts["device"] == "cuda":
            opts.update(device="hybrid", gpu_device=stand_in, gpu_mem=opts.get("gpu_mem") or 8 << 30)
        model = load(path, **opts)
        r = _run(model, prompt, n_gen)
        logits = r.pop("logits")
        if ref is None:
            ref = logits
        r["rel_l2_vs_cpu"] = _rel_l2(logits, ref)
        r["top1_vs_cpu"] = float((logits.argmax(-1) == ref.argmax(-1)).mean())
        r.update(_counters(model))
        rows[name] = r
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"model": str(path), "n_prompt": n_prompt, "n_gen": n_gen, "stand_in": stand_in, "configs": rows}


def markdown(result: dict) -> str:
    lines = ["| configuration | prefill t/s | decode t/s | rel. L2 vs CPU | top-1 vs CPU | cache hit rate | ring uploads (ready in advance) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result["configs"].items():
        hit = f"{100 * r['hit_rate']:.1f} %" if "hit_rate" in r else "-"
        ring = f"{r['ring_uploads']} ({r['ring_ready_at_begin']})" if "ring_uploads" in r else "-"
        lines.append(f"| {name} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {r['rel_l2_vs_cpu']:.2e} | "
                     f"{100 * r['top1_vs_cpu']:.1f} % | {hit} | {ring} |")
    return "\n".join(lines)
