"""End-to-end decode and prefill benchmarks on a model file, against llama.cpp on the same file.

Both sides run the same tokens at the same context depth with the same thread count, in turns
(never at once: llama.cpp with 2 threads slows 30-100x when anything else runs): both are loaded,
and rounds of ours and llama.cpp alternate, each side keeping its best round.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from hybrid_runtime.bench.kernels import ReadBandwidth
from hybrid_runtime.oracle import open_llama
from hybrid_runtime.util import quiet_stderr


# Rounds of a comparison: ours and llama.cpp, both loaded, alternate; each keeps its best. This CPU's
# speed moves by up to 1.5x within seconds (docs/benchmarks.md): one after the other, a ratio
# measured which state each side happened to get.
PREFILL_ROUNDS = DECODE_ROUNDS = 3
SETTLE_S = 0.5


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, min(vocab, 2000), n).tolist()


def _ours_decode_start(model, n_prompt: int):
    """A cache holding an n_prompt-token prefill and one warm-up step; the token to feed next."""
    cache = model.new_cache()
    logits = model.forward(_tokens(n_prompt, model.n_vocab), cache)
    token = int(np.argmax(logits[-1]))
    logits = model.forward([token], cache)  # warm-up step (first-call compilation, page faults)
    return cache, int(np.argmax(logits[-1]))


def _ours_decode_steps(model, cache, token: int, n_gen: int) -> tuple[dict, int]:
    """n_gen timed steps: the median step, and the median time of the same steps spent outside
    the compute kernels (Python and small-op overhead)."""
    from hybrid_runtime.bench.timing import kernel_timer

    times, rest = [], []
    with kernel_timer() as spent:
        for _ in range(n_gen):
            spent[0] = 0.0
            t0 = time.perf_counter()
            logits = model.forward([token], cache)
            times.append(time.perf_counter() - t0)
            rest.append(times[-1] - spent[0])
            token = int(np.argmax(logits[-1]))
    step = float(np.median(times))
    n_layer = model.config.n_layer
    return {"tokens_per_s": 1.0 / step, "step_s": step, "per_layer_s": step / n_layer,
            "overhead_per_layer_s": float(np.median(rest)) / n_layer}, token


def ours_decode(model, n_prompt: int, n_gen: int) -> dict:
    """Decode n_gen tokens after an n_prompt-token prefill (see _ours_decode_steps)."""
    cache, token = _ours_decode_start(model, n_prompt)
    return _ours_decode_steps(model, cache, token, n_gen)[0]


def ours_prefill(model, n_prompt: int, repeats: int = 2) -> dict:
    toks = _tokens(n_prompt, model.n_vocab, seed=1)
    model.forward(toks[:8], model.new_cache())  # warm-up
    best = min(_timed(lambda: model.forward(toks, model.new_cache())) for _ in range(repeats))
    return {"tokens_per_s": n_prompt / best, "seconds": best}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _llama_decode_steps(llm, n_gen: int) -> dict:
    token = 100  # the token fed back does not change the work of a step
    times = []
    with quiet_stderr():
        for _ in range(n_gen):
            t0 = time.perf_counter()
            llm.eval([token])
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"tokens_per_s": 1.0 / step, "step_s": step}


def _open_llama_decode(path, threads: int, n_ctx: int, n_prompt: int, betas):
    """llama.cpp on the file with an n_prompt-token prefill and one warm-up step."""
    llm = open_llama(path, n_ctx=n_ctx, threads=threads, yarn_betas=betas, f32_kv=False, logits_all=False)
    with quiet_stderr():
        llm.eval(_tokens(n_prompt, llm.n_vocab()))
        llm.eval([100])
    return llm


def decode_side_by_side(model, path, threads: int, n_prompt: int, n_gen: int, rounds: int = DECODE_ROUNDS) -> dict:
    """Both loaded at once, `rounds` alternating runs of n_gen steps each after the same prompt
    length (the context grows by n_gen a round on both sides); each side keeps its best round."""
    llm = _open_llama_decode(path, threads, n_prompt + rounds * (n_gen + 1) + 16, n_prompt, model.yarn_betas)
    try:
        cache, token = _ours_decode_start(model, n_prompt)
        ours, theirs = [], []
        for _ in range(rounds):  # a pause before each run: the other side's threads stop spinning
            time.sleep(SETTLE_S)
            r, token = _ours_decode_steps(model, cache, token, n_gen)
            ours.append(r)
            time.sleep(SETTLE_S)
            theirs.append(_llama_decode_steps(llm, n_gen))
    finally:
        llm.close()
        gc.collect()
    a = min(ours, key=lambda r: r["step_s"])
    b = min(theirs, key=lambda r: r["step_s"])
    return {"ours": {**a, "rounds_step_s": [r["step_s"] for r in ours]},
            "llama_cpp": {**b, "rounds_step_s": [r["step_s"] for r in theirs]},
            "ratio": b["step_s"] / a["step_s"], "rounds": rounds}


def _open_llama_prefill(path, threads: int, n_prompt: int, betas):
    return open_llama(path, n_ctx=n_prompt + 16, n_ubatch=512, threads=threads, yarn_betas=betas, f32_kv=False,
                      logits_all=False)


def _llama_prefill_once(llm, toks) -> float:
    with quiet_stderr():
        llm.reset()  # the next eval drops the cache from position 0
        return _timed(lambda: llm.eval(toks))



def prefill_side_by_side(model, path, threads: int, n_prompt: int, rounds: int = PREFILL_ROUNDS) -> dict:
    """Both loaded at once, `rounds` alternating prefills of the same tokens."""
    llm = _open_llama_prefill(path, threads, n_prompt, model.yarn_betas)
    toks = _tokens(n_prompt, model.n_vocab, seed=1)
    try:
        model.forward(toks[:8], model.new_cache())  # warm-up, both
        with quiet_stderr():
            llm.eval(toks[:8])
        ours, theirs = [], []
        for _ in range(rounds):  # a pause before each run: the other side's threads stop spinning
            time.sleep(SETTLE_S)
            ours.append(_timed(lambda: model.forward(toks, model.new_cache())))
            time.sleep(SETTLE_S)
            theirs.append(_llama_prefill_once(llm, toks))
    finally:
        llm.close()
        gc.collect()
    a, b = min(ours), min(theirs)
    return {"ours": {"tokens_per_s": n_prompt / a, "seconds": a, "rounds_s": ours},
            "llama_cpp": {"tokens_per_s": n_prompt / b, "seconds": b, "rounds_s": theirs},
            "ratio": b / a, "tokens": n_prompt, "rounds": rounds}


def step_bytes(gf, cfg) -> int:
    """Bytes one decode step reads: every layer's non-expert tensors and K of its routed experts,
    the output norm and head (the embedding: one row, left out)."""
    from hybrid_runtime.bench.roofline import layer_active_bytes

    head = "token_embd.weight" if cfg.tied_output else "output.weight"
    rest = sum(gf.tensors[n].n_bytes for n in (head, "output_norm.weight") if n in gf.tensors)
    return sum(layer_active_bytes(gf, cfg, i) for i in range(cfg.n_layer)) + rest


def _judge_bandwidth(nbytes: int, ours: dict, before: float, after: float) -> dict:
    """The decode step's effective read rate against the streaming read bandwidth measured right
    before and right after it (GB/s; this machine's bandwidth can flip between states)."""
    gbs = nbytes / ours["step_s"] / 1e9
    return {"bytes_per_step": nbytes, "effective_gbs": gbs, "read_gbs_before": before, "read_gbs_after": after,
            "fraction_before": gbs / before, "fraction_after": gbs / after}


def bench_model(path, threads: int, n_prompt: int = 512, n_gen: int = 32, decode_prompt: int = 16,
                compare: bool = False, what: tuple[str, ...] = ("decode", "prefill"), **load_opts) -> dict:
    import hybrid_runtime as hr

    from hybrid_runtime.cpu.step import threading_layer
    from hybrid_runtime.quant.cpu_features import prefetch_bytes

    t0 = time.perf_counter()
    model = hr.load(path, threads=threads, n_ctx=max(n_prompt, decode_prompt) + DECODE_ROUNDS * (n_gen + 1) + 64,
                    **load_opts)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.forward([1], model.new_cache())  # the first step: Numba compiles here, or loads its cache
    out: dict = {"model": str(path), "threads": threads, "n_layer": model.config.n_layer,
                 "path": model.placement_summary(), "threading_layer": threading_layer(),
                 "prefetch_bytes": prefetch_bytes(),
                 "load_s": load_s, "first_step_s": time.perf_counter() - t0}
    if "decode" in what:
        bw = ReadBandwidth(1 << 30)  # one buffer for the reads right before and right after
        before = bw.measure(threads)
        out["decode"] = decode_side_by_side(model, path, threads, decode_prompt, n_gen) if compare \
            else {"ours": ours_decode(model, decode_prompt, n_gen)}
        out["decode"]["context"] = decode_prompt
        out["decode"]["bandwidth"] = _judge_bandwidth(step_bytes(model.file, model.config), out["decode"]["ours"],
                                                      before, bw.measure(threads))
        del bw
    if "prefill" in what:
        out["prefill"] = prefill_side_by_side(model, path, threads, n_prompt) if compare \
            else {"ours": ours_prefill(model, n_prompt), "tokens": n_prompt}
    del model
    gc.collect()
    return out
