"""Shapes and hyper-parameters of the synthetic deepseek2 models (tiny, demo and scale)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hybrid_runtime.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class Preset:
    """One synthetic deepseek2 model: everything the GGUF metadata and tensor shapes need."""

    name: str
    n_layer: int
    n_dense_lead: int
    hidden: int                 # D
    n_head: int                 # H
    q_lora: int                 # 0 = no q-LoRA (plain attn_q; needs 26 or 27 layers)
    kv_lora: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    n_expert: int               # E
    n_expert_used: int
    n_shared: int
    expert_ff: int              # F
    dense_ff: int
    gating: int                 # 1 softmax, 2 sigmoid (llama.cpp expert_gating_func)
    probs_bias: bool            # write blk.N.exp_probs_b.bias
    weights_norm: bool
    weights_scale: float
    n_group: int = 1
    n_group_used: int = 1
    yarn_factor: float = 32.0
    yarn_orig_ctx: int = 4096
    mscale_all_dim: float = 1.0
    rms_eps: float = 1e-6
    rope_base: float = 50000.0
    context_length: int = 131072
    kv_layout: str = "split"    # split: attn_k_b/attn_v_b (MLA); combined: legacy attn_kv_b
    write_gating_key: bool = True
    vocab: int = 2048           # tokens written (synth/tokenizer.py pads its BPE vocabulary to this)
    real_vocab: int = 0         # the real model's vocabulary: metadata-only files use it for true sizes

    @property
    def n_moe_layer(self) -> int:
        return self.n_layer - self.n_dense_lead

    def replace(self, **changes) -> "Preset":
        """A copy with some fields changed (e.g. fewer layers or experts for a fast test)."""
        return dataclasses.replace(self, **changes)


KIMI_K2_TINY = Preset(
    name="kimi-k2-tiny", n_layer=3, n_dense_lead=1, hidden=256, n_head=4,
    q_lora=256, kv_lora=128, rope_dim=32, nope_dim=64, v_dim=64,
    n_expert=16, n_expert_used=4, n_shared=1, expert_ff=256, dense_ff=512,
    gating=2, probs_bias=True, weights_norm=True, weights_scale=2.827,
    yarn_factor=32.0, mscale_all_dim=1.0,
)

DEEPSEEK_V3_TINY = KIMI_K2_TINY.replace(
    name="deepseek-v3-tiny", n_expert=32, n_group=8, n_group_used=4,
    weights_scale=2.5, yarn_factor=40.0, rope_base=10000.0, context_length=163840,
)

# n_layer must be 26 or 27: llama.cpp only accepts a model without q-LoRA as "lite".
DEEPSEEK_V2_LITE_TINY = Preset(
    name="deepseek-v2-lite-tiny", n_layer=26, n_dense_lead=1, hidden=256, n_head=4,
    q_lora=0, kv_lora=128, rope_dim=32, nope_dim=64, v_dim=64,
    n_expert=16, n_expert_used=6, n_shared=2, expert_ff=64, dense_ff=256,
    gating=1, probs_bias=False, weights_norm=False, weights_scale=1.0,
    n_group=1, n_group_used=1, yarn_factor=40.0, mscale_all_dim=0.707,
    rope_base=10000.0, context_length=163840, kv_layout="combined",
)

KIMI_K2_DEMO = KIMI_K2_TINY.replace(
    name="kimi-k2-demo", n_layer=6, hidden=512, n_head=8, q_lora=384, kv_lora=256,
    rope_dim=64, nope_dim=64, v_dim=64, n_expert=32, n_expert_used=8,
    expert_ff=512, dense_ff=1024,
)

# Scale models: random quant blocks written directly (scripts/make_scale_model.py).
KIMI_K2 = KIMI_K2_TINY.replace(
    name="kimi-k2", n_layer=61, hidden=7168, n_head=64, q_lora=1536, kv_lora=512,
    rope_dim=64, nope_dim=128, v_dim=128, n_expert=384, n_expert_used=8,
    expert_ff=2048, dense_ff=18432, real_vocab=163840,
)

MEDIUM = KIMI_K2_TINY.replace(
    name="medium", n_layer=12, hidden=2048, n_head=16, q_lora=768, kv_lora=512,
    rope_dim=64, nope_dim=128, v_dim=128, n_expert=64, n_expert_used=8,
    expert_ff=768, dense_ff=6144,
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (KIMI_K2_TINY, DEEPSEEK_V3_TINY, DEEPSEEK_V2_LITE_TINY, KIMI_K2_DEMO, KIMI_K2, MEDIUM)
}
TINY_PRESETS = ("kimi-k2-tiny", "deepseek-v3-tiny", "deepseek-v2-lite-tiny", "kimi-k2-demo")
SCALE_PRESETS = ("kimi-k2", "medium")


def get_preset(name: str) -> Preset:
    """The preset called `name`; raises InvalidRequestError for an unknown name."""
    if name not in PRESETS:
        raise InvalidRequestError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]
