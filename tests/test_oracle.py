"""The model path against llama.cpp on the same GGUF file (design.md §3.7).

- tight: our exact float path on the quantized file vs llama.cpp on the F32 twin (F32 KV);
- statistical: our default path vs llama.cpp on the quantized file, judged against llama.cpp's
  own spread between ubatch 1 and ubatch 512 on the same tokens;
- greedy: 32 greedy tokens identical to llama.cpp's on an F32 model.
"""

from __future__ import annotations

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime.oracle import llama_cpp_greedy, llama_cpp_logits, rel_l2, top1_agreement

TIGHT_CASES = [
    ("kimi-k2-tiny", "Q4_K_M", {}),
    ("kimi-k2-tiny", "Q8_0", {}),
    ("kimi-k2-tiny", "Q2_K", {}),
    ("kimi-k2-tiny", "Q3_K_M", {}),
    ("kimi-k2-tiny", "Q5_K_M", {}),
    ("kimi-k2-tiny", "Q6_K", {}),
    ("kimi-k2-tiny", "Q4_0", {"tied_output": True}),
    ("kimi-k2-tiny", "Q5_1", {"kv_layout": "combined"}),
    ("deepseek-v3-tiny", "Q4_K_M", {}),
    ("deepseek-v3-tiny", "Q4_1", {}),
    ("deepseek-v2-lite-tiny", "Q4_K_M", {}),
    ("deepseek-v2-lite-tiny", "Q5_0", {"kv_layout": "split"}),
    ("kimi-k2-tiny", "F16", {}),
    ("kimi-k2-tiny", "BF16", {}),
]


def _tokens(n: int, vocab: int) -> list[int]:
    return np.random.default_rng().integers(0, vocab, n).tolist()


@pytest.mark.parametrize("preset,quant,kw", TIGHT_CASES, ids=[f"{p}-{q}-{'-'.join(k)}" for p, q, k in TIGHT_CASES])
def test_reference_path_matches_llama_cpp_on_f32_twin(tiny, preset, quant, kw):
    path, twin = tiny(preset, quant, **kw)
    model = hr.load(path, compute="reference")
    toks = _tokens(48, model.n_vocab)
    ours = model.logits(toks)
    theirs = llama_cpp_logits(twin, toks, yarn_betas=model.yarn_betas)
    err = rel_l2(ours, theirs)
    print(f"{preset} {quant} {kw}: rel L2 {err:.2e}, top-1 {top1_agreement(ours, theirs):.3f}")
    assert ours.shape == (48, model.n_vocab) and ours.dtype == np.float32
    assert err <= 1e-4
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


STAT_CASES = [("kimi-k2-tiny", "Q4_K_M", {}), ("kimi-k2-tiny", "Q6_K", {}), ("kimi-k2-tiny", "Q2_K", {}),
              ("kimi-k2-tiny", "Q8_0", {}), ("deepseek-v3-tiny", "Q4_K_M", {}),
              ("deepseek-v2-lite-tiny", "Q4_K_M", {"kv_layout": "split"})]


def _logits_over(models_and_ubatch, path, seqs, betas):
    ours = {name: np.concatenate([m.logits(t) for t in seqs]) for name, m in models_and_ubatch.items()}
    big = np.concatenate([llama_cpp_logits(path, t, n_ubatch=512, yarn_betas=betas) for t in seqs])
    one = np.concatenate([llama_cpp_logits(path, t, n_ubatch=1, yarn_betas=betas) for t in seqs])
    return ours, big, one


@pytest.mark.parametrize("preset,quant,kw", STAT_CASES, ids=[f"{p}-{q}" for p, q, _ in STAT_CASES])
def test_fast_path_within_llama_cpp_spread(tiny, preset, quant, kw):
    """Our default path vs llama.cpp on the quantized file, in units of the reordering noise.

    Both sides round activations to Q8_K/Q8_0 before each quantized matmul; where two correct
    implementations sum in a different order, an occasional rounding flips and the random network
    amplifies it. The noise scale is the larger of llama.cpp's spread between ubatch 1 and 512 on
    the same tokens and the distance between our two renditions of the same arithmetic (integer
    kernels vs float emulation): llama.cpp runs the very same kernel for both ubatch sizes on some
    types, where its own spread is exactly 0.
    """
    path, _ = tiny(preset, quant, **kw)
    fast, emulated = hr.load(path), hr.load(path, cpu_kernels=False)
    rng = np.random.default_rng()
    seqs = [rng.integers(0, fast.n_vocab, 64).tolist() for _ in range(12)]
    ours, big, one = _logits_over({"fast": fast, "emulated": emulated}, path, seqs, fast.yarn_betas)
    spread = max(rel_l2(one, big), rel_l2(ours["emulated"], ours["fast"]))
    miss_spread = max(1 - top1_agreement(one, big), 1 - top1_agreement(ours["emulated"], ours["fast"]))
    for name in ("fast", "emulated"):
        err, miss = rel_l2(ours[name], big), 1 - top1_agreement(ours[name], big)
        print(f"{preset} {quant} {name}: {err:.2e} (top-1 miss {miss:.3f}), noise {spread:.2e} (miss {miss_spread:.3f})")
        assert err <= 1.5 * spread
        # a random model has near-ties between its two best tokens at ~2 % of positions
        assert miss <= 1.5 * miss_spread + 0.025


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q6_K"])
def test_activation_rounding_reproduces_llama_cpp_exactly_on_one_layer(tiny, quant):
    """On a one-layer (dense) model most positions match llama.cpp's quantized arithmetic to float noise."""
    from hybrid_runtime.synth import get_preset

    path, _ = tiny(get_preset("kimi-k2-tiny").replace(n_layer=1), quant)
    m = hr.load(path)
    toks = _tokens(48, m.n_vocab)
    ours, theirs = m.logits(toks), llama_cpp_logits(path, toks, yarn_betas=m.yarn_betas)
    per_pos = np.array([rel_l2(ours[i], theirs[i]) for i in range(len(toks))])
    ref = hr.load(path, compute="reference").logits(toks)
    ref_pos = np.array([rel_l2(ref[i], theirs[i]) for i in range(len(toks))])
    print(f"{quant}: median per-position {np.median(per_pos):.1e} (float path without rounding {np.median(ref_pos):.1e})")
    assert np.median(per_pos) <= 1e-5 < np.median(ref_pos)


@pytest.mark.parametrize("preset", ["kimi-k2-tiny", "deepseek-v3-tiny"])
def test_greedy_32_tokens_identical_on_f32_model(tiny, preset):
    from hybrid_runtime.engine.generate import Sequence, generate
    from hybrid_runtime.engine.sampling import SamplingParams

    _, twin = tiny(preset, "Q4_K_M")
    model = hr.load(twin)
    prompt = _tokens(8, model.n_vocab)
    steps = generate(model, model.tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=32),
                     Sequence(model.new_cache()))
    ours = [s.token for s in steps if s.token is not None]
    theirs = llama_cpp_greedy(twin, prompt, 32, yarn_betas=model.yarn_betas)
    # generation ends at (and includes, as a step without text) an end-of-generation token
    n = next((i + 1 for i, t in enumerate(theirs) if t in model.tokenizer.eog_ids), len(theirs))
    assert ours == theirs[:n]


def test_yarn_betas_matter_and_are_overridable(tiny):
    path, twin = tiny("kimi-k2-tiny", "Q4_K_M")
    default = hr.load(path, compute="reference")
    assert default.yarn_betas == (1.0, 1.0)  # Kimi K2's published values, recognised from the file
    other = hr.load(path, compute="reference", yarn_beta_fast=32.0, yarn_beta_slow=1.0)
    toks = _tokens(40, default.n_vocab)
    a, b = default.logits(toks), other.logits(toks)
    theirs = llama_cpp_logits(twin, toks, yarn_betas=(32.0, 1.0))
    assert rel_l2(a, b) > 1e-3  # YaRN changes frequencies at every position
    assert rel_l2(b, theirs) <= 1e-4


# -- the hybrid (GPU) code path, with torch on the CPU standing in for the GPU ------------------
# A budget a little over the runtime reserve leaves room for some hot-expert slots, so both the
# "cached on the GPU" and the "CPU kernels" halves of every MoE layer run.
HYBRID = dict(device="hybrid", gpu_device="cpu", gpu_mem="1040MiB")


@pytest.mark.parametrize("preset,quant", [("kimi-k2-tiny", "Q4_K_M"), ("deepseek-v3-tiny", "Q6_K")])
def test_hybrid_path_reference_matches_llama_cpp_on_f32_twin(tiny, preset, quant):
    path, twin = tiny(preset, quant)
    model = hr.load(path, compute="reference", **HYBRID)
    toks = _tokens(40, model.n_vocab)
    ours = model.logits(toks)
    theirs = llama_cpp_logits(twin, toks, yarn_betas=model.yarn_betas)
    assert rel_l2(ours, theirs) <= 1e-4
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("preset,quant", [("kimi-k2-tiny", "Q4_K_M"), ("deepseek-v3-tiny", "Q4_K_M")])
def test_hybrid_path_within_llama_cpp_spread(tiny, preset, quant):
    path, _ = tiny(preset, quant)
    hybrid = hr.load(path, **HYBRID)
    cache = hybrid.net.ffn[-1].experts.cache
    assert cache is not None and cache.pool.shape[0] > 0
    models = {"hybrid": hybrid, "fast": hr.load(path), "emulated": hr.load(path, cpu_kernels=False)}
    rng = np.random.default_rng()
    seqs = [rng.integers(0, hybrid.n_vocab, 64).tolist() for _ in range(12)]
    ours, big, one = _logits_over(models, path, seqs, hybrid.yarn_betas)
    err = rel_l2(ours["hybrid"], big)
    spread = max(rel_l2(one, big), rel_l2(ours["emulated"], ours["fast"]))
    print(f"hybrid {preset} {quant}: ours {err:.2e}, noise {spread:.2e}")
    assert err <= 1.5 * spread
