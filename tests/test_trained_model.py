"""The trained Kimi K2-layout model (assets/kimi-k2-stdlib) against two independent oracles.

- transformers' DeepseekV3 forward pass on the checked-in checkpoint: our F32 paths on the F32
  export, both attention layouts, to ~1e-5 relative L2;
- llama.cpp on the same quantized files, over Python source that is in no training corpus (this
  project's own code): our default path's perplexity within 0.5 % of llama.cpp's, its KL-divergence
  to the F32 model no worse than llama.cpp's (mean: 10 % and the paired noise of four windows;
  median: 25 %), top-1 agreement with
  llama.cpp >= 97 %. A trained network is not chaotic the way a random one is, so these bounds
  are tight. (Top-1 stays below the 99 % first hoped for: this small model has many near-tied
  next tokens, and llama.cpp agrees with itself between ubatch 512 and 1 on only ~99.3 % of them
  on Q4_K_M; measured here 97.9-99.2 % per quant, the KL-divergence bound is the sharp one.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime import perplexity as px
from hybrid_runtime.config import PREFILL_PRECISIONS
from hybrid_runtime.oracle import llama_cpp_scorer, rel_l2

ROOT = Path(__file__).resolve().parent.parent
QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1", "F16", "BF16"]
N_CTX, WINDOWS = 512, 4


@pytest.fixture(scope="module")
def trained(tiny):
    def build(quant: str, kv_layout: str = "split"):
        return tiny("kimi-k2-stdlib", quant, kv_layout=kv_layout)
    return build


@pytest.fixture(scope="module")
def held_out_text() -> str:
    """Python that no training corpus holds: this project's own top-level modules."""
    return "".join(p.read_text() for p in sorted((ROOT / "hybrid_runtime").glob("*.py")))


def _hf_model():
    transformers = pytest.importorskip("transformers")
    import torch

    from hybrid_runtime.synth.trained import hf_config, load_checkpoint

    state, vocab, preset = load_checkpoint()
    model = transformers.DeepseekV3ForCausalLM(hf_config(preset, vocab)).eval()
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("kv_layout,compute,compiled", [("split", "reference", False), ("split", "fast", False),
                                                        ("split", "fast", True), ("combined", "reference", False)])
def test_f32_paths_match_transformers(trained, held_out_text, kv_layout, compute, compiled):
    import torch

    f32 = trained("F32", kv_layout)[0]
    ours = hr.load(f32, compute=compute, compiled=compiled, threads=2)
    ids = ours.tokenize(held_out_text)
    start = int(np.random.default_rng().integers(0, len(ids) - 200))
    window = ids[start: start + 200]                       # a fresh slice each run
    with torch.no_grad():
        theirs = _hf_model()(input_ids=torch.tensor([window])).logits[0].numpy()
    err = rel_l2(ours.logits(window), theirs)
    print(f"{kv_layout} {compute}: rel L2 vs transformers {err:.2e}")
    assert err <= 1e-5


@pytest.fixture(scope="module")
def f32_base(trained, held_out_text):
    model = hr.load(trained("F32")[0], compute="reference", n_ctx=N_CTX, threads=2)
    windows = px.make_windows(model.tokenize(held_out_text), N_CTX, WINDOWS)
    return windows, px.scored_log_probs(model.logits, windows)


@pytest.mark.parametrize("quant", QUANTS)
def test_default_path_perplexity_matches_llama_cpp(trained, f32_base, quant):
    """Every prefill precision against llama.cpp on the same file. Each: perplexity within 0.5 %
    and KL-divergence to the F32 model no worse than llama.cpp's. The exact path (llama.cpp's
    activation rounding) also agrees with llama.cpp's top-1; the others (int8, the default: the
    panel GEMM with llama.cpp's activation quantization; bf16, closer to F32 than llama.cpp) have
    their top-1 judged against F32's, beside llama.cpp's."""
    path = trained(quant)[0]
    windows, base = f32_base
    with llama_cpp_scorer(path, N_CTX, threads=2, yarn_betas=hr.load(path).yarn_betas) as score:
        theirs = px.scored_log_probs(score, windows)
    vs_f32_theirs = px.kl_divergence(base, theirs)
    for precision in PREFILL_PRECISIONS:
        model = hr.load(path, n_ctx=N_CTX, threads=2, prefill_precision=precision)
        ours = px.scored_log_probs(model.logits, windows)
        p_ours = px.perplexity(ours, windows, model.tokenizer.token_bytes)
        p_theirs = px.perplexity(theirs, windows, model.tokenizer.token_bytes)
        agree, vs_f32 = px.kl_divergence(theirs, ours), px.kl_divergence(base, ours)
        diff = px.kl_per_position(base, ours) - px.kl_per_position(base, theirs)
        noise = 2 * diff.std(ddof=1) / np.sqrt(len(diff))  # two standard errors of the paired mean
        print(f"{quant} {precision}: ppl ours {p_ours.ppl:.4f}, llama.cpp {p_theirs.ppl:.4f}, bpb "
              f"{p_ours.bits_per_byte:.3f}, top-1 vs llama.cpp {agree.top1:.4f}, vs F32 {vs_f32.top1:.4f} "
              f"(llama.cpp {vs_f32_theirs.top1:.4f}); KLD to F32 ours {vs_f32.mean:.2e} (median "
              f"{vs_f32.median:.2e}), llama.cpp {vs_f32_theirs.mean:.2e} ({vs_f32_theirs.median:.2e}), noise {noise:.1e}")
        assert abs(p_ours.ppl / p_theirs.ppl - 1) <= 0.005
        # The mean KLD of a near-lossless file is a handful of routing near-ties that flip (F16:
        # the top 3 of 1,020 positions hold 97 % of it, for llama.cpp too), so the mean is judged
        # within the noise of four windows, and the median, which those flips do not move, tightly.
        assert vs_f32.mean <= 1.1 * vs_f32_theirs.mean + noise + 1e-6
        assert vs_f32.median <= 1.25 * vs_f32_theirs.median + 1e-7
        if precision == "exact":
            assert agree.top1 >= 0.97
        else:
            assert vs_f32.top1 >= vs_f32_theirs.top1 - 0.01
    if quant == "Q4_K_M":                                    # the demo file: it has learned Python
        assert p_ours.bits_per_byte <= 2.5                   # (a random model: ~8)
