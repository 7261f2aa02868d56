"""The trained Kimi K2-layout model (assets/kimi-k2-stdlib) against two independent oracles.

- transformers' DeepseekV3 forward pass on the checked-in checkpoint: our F32 paths on the F32
  export, both attention layouts, to ~1e-5 relative L2;
- llama.cpp on the same quantized files: perplexity of our default path within 0.5 % of llama.cpp's
  over Python source that is in no training corpus (this project's own code), top-1 >= 99 %.
A trained network is not chaotic the way a random one is, so these bounds are tight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime import perplexity as px
from hybrid_runtime.oracle import llama_cpp_scorer, rel_l2

ROOT = Path(__file__).resolve().parent.parent
QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1", "F16", "BF16"]
N_CTX, WINDOWS = 256, 4


@pytest.fixture(scope="module")
def trained(tiny):
    def build(quant: str, kv_layout: str = "split"):
        return tiny("kimi-k2-stdlib", quant, kv_layout=kv_layout)
    return build


@pytest.fixture(scope="module")
def held_out_text() -> str:
    """Python that no training corpus holds: a few of this project's own modules."""
    return "".join((ROOT / "hybrid_runtime" / f).read_text() for f in ("perplexity.py", "oracle.py", "engine/sampling.py"))


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


@pytest.mark.parametrize("quant", QUANTS)
def test_default_path_perplexity_matches_llama_cpp(trained, held_out_text, quant):
    path = trained(quant)[0]
    model = hr.load(path, n_ctx=N_CTX, threads=2)
    windows = px.make_windows(model.tokenize(held_out_text), N_CTX, WINDOWS)
    ours = px.scored_log_probs(model.logits, windows)
    with llama_cpp_scorer(path, N_CTX, threads=2, yarn_betas=model.yarn_betas) as score:
        theirs = px.scored_log_probs(score, windows)
    p_ours = px.perplexity(ours, windows, model.tokenizer.token_bytes)
    p_theirs = px.perplexity(theirs, windows, model.tokenizer.token_bytes)
    agree = px.kl_divergence(theirs, ours)
    print(f"{quant}: ppl ours {p_ours.ppl:.4f}, llama.cpp {p_theirs.ppl:.4f}, bpb {p_ours.bits_per_byte:.3f}, "
          f"top-1 {agree.top1:.4f}, KLD {agree.mean:.2e}")
    assert abs(p_ours.ppl / p_theirs.ppl - 1) <= 0.005
    assert agree.top1 >= 0.99
    if quant == "Q4_K_M":                                    # the demo file: it has learned Python
        assert p_ours.bits_per_byte <= 2.5                   # (a random model: ~8)
