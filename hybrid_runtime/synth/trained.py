"""The trained demo model: a tiny Kimi K2-layout network trained on the standard library.

`scripts/train_tiny_model.py` trains it with Hugging Face transformers' DeepseekV3 model (an
implementation independent of ours and of llama.cpp) and writes the checkpoint into
`assets/kimi-k2-stdlib/`: `checkpoint.npz` (the transformers state dict in float16),
`tokenizer.json` (the BPE merges learned by synth/tokenizer.py) and `config.json` (the preset
and the training record). `write_trained_gguf` exports it with the project's GGUF writer in
either attention layout; `make_trained_model` quantizes that with llama.cpp's quantizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.errors import ModelFormatError
from hybrid_runtime.synth.chat_template import kimi_k2_template
from hybrid_runtime.synth.layout import tensor_specs
from hybrid_runtime.synth.presets import KIMI_K2_TINY, Preset
from hybrid_runtime.synth.tokenizer import Vocab, add_tokenizer, vocab_from_merges
from hybrid_runtime.synth.writer import PlannedTensor, add_model_metadata, write_streaming

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "kimi-k2-stdlib"
F32 = gguf.GGMLQuantizationType.F32

# Kimi K2's layout at toy size: q-LoRA MLA, sigmoid routing with the correction bias and the
# routed scale 2.827, one shared expert, one leading dense layer, YaRN 32 over 4096 (betas 1/1).
STDLIB_PRESET = KIMI_K2_TINY.replace(name="kimi-k2-stdlib", n_layer=4, vocab=4096)


def hf_config(p: Preset = STDLIB_PRESET, vocab: Vocab | None = None):
    """transformers' DeepseekV3Config for the preset (the training script's model)."""
    from transformers import DeepseekV3Config

    ids = {} if vocab is None else dict(bos_token_id=vocab.token_id("[BOS]"), eos_token_id=vocab.token_id("[EOS]"))
    return DeepseekV3Config(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.dense_ff,
        moe_intermediate_size=p.expert_ff, num_hidden_layers=p.n_layer, num_attention_heads=p.n_head,
        num_key_value_heads=p.n_head, n_shared_experts=p.n_shared, n_routed_experts=p.n_expert,
        routed_scaling_factor=p.weights_scale, kv_lora_rank=p.kv_lora, q_lora_rank=p.q_lora,
        qk_rope_head_dim=p.rope_dim, v_head_dim=p.v_dim, qk_nope_head_dim=p.nope_dim,
        n_group=p.n_group, topk_group=p.n_group_used, num_experts_per_tok=p.n_expert_used,
        first_k_dense_replace=p.n_dense_lead, norm_topk_prob=p.weights_norm,
        max_position_embeddings=int(p.yarn_factor * p.yarn_orig_ctx), rms_norm_eps=p.rms_eps,
        tie_word_embeddings=False, rope_interleave=True, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": p.rope_base, "factor": p.yarn_factor,
                         "original_max_position_embeddings": p.yarn_orig_ctx, "beta_fast": 1.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": p.mscale_all_dim},
        **ids,
    )


def gguf_tensors(state: dict[str, np.ndarray], p: Preset, kv_layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order) for every tensor of a transformers state dict."""
    def get(name: str) -> np.ndarray:
        return np.asarray(state[name], dtype=np.float32)

    yield "token_embd.weight", get("model.embed_tokens.weight")
    for il in range(p.n_layer):
        hf, b = f"model.layers.{il}", f"blk.{il}"
        yield from _attention(get, hf, b, p, kv_layout)
        yield f"{b}.ffn_norm.weight", get(f"{hf}.post_attention_layernorm.weight")
        if il < p.n_dense_lead:
            for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                yield f"{b}.{ours}.weight", get(f"{hf}.mlp.{theirs}.weight")
            continue
        yield f"{b}.ffn_gate_inp.weight", get(f"{hf}.mlp.gate.weight")
        yield f"{b}.exp_probs_b.bias", get(f"{hf}.mlp.gate.e_score_correction_bias")
        gate_up = get(f"{hf}.mlp.experts.gate_up_proj")                # [E, 2F, D]: gate rows, then up rows
        yield f"{b}.ffn_gate_exps.weight", gate_up[:, : p.expert_ff]
        yield f"{b}.ffn_up_exps.weight", gate_up[:, p.expert_ff:]
        yield f"{b}.ffn_down_exps.weight", get(f"{hf}.mlp.experts.down_proj")   # [E, D, F]
        for ours, theirs in (("ffn_gate_shexp", "gate_proj"), ("ffn_up_shexp", "up_proj"),
                             ("ffn_down_shexp", "down_proj")):
            yield f"{b}.{ours}.weight", get(f"{hf}.mlp.shared_experts.{theirs}.weight")
    yield "output_norm.weight", get("model.norm.weight")
    yield "output.weight", get("lm_head.weight")


def _attention(get, hf: str, b: str, p: Preset, kv_layout: str) -> Iterator[tuple[str, np.ndarray]]:
    a = f"{hf}.self_attn"
    yield f"{b}.attn_norm.weight", get(f"{hf}.input_layernorm.weight")
    yield f"{b}.attn_q_a_norm.weight", get(f"{a}.q_a_layernorm.weight")
    yield f"{b}.attn_q_a.weight", get(f"{a}.q_a_proj.weight")
    yield f"{b}.attn_q_b.weight", get(f"{a}.q_b_proj.weight")
    yield f"{b}.attn_kv_a_norm.weight", get(f"{a}.kv_a_layernorm.weight")
    yield f"{b}.attn_kv_a_mqa.weight", get(f"{a}.kv_a_proj_with_mqa.weight")
    kv_b = get(f"{a}.kv_b_proj.weight")                                   # [H*(N+V), C], per head [k_nope | v]
    if kv_layout == "combined":
        yield f"{b}.attn_kv_b.weight", kv_b
    else:                                                                  # as llama.cpp's converter splits it
        per_head = kv_b.reshape(p.n_head, p.nope_dim + p.v_dim, p.kv_lora)
        yield f"{b}.attn_k_b.weight", np.ascontiguousarray(per_head[:, : p.nope_dim].transpose(0, 2, 1))  # [H, C, N]
        yield f"{b}.attn_v_b.weight", np.ascontiguousarray(per_head[:, p.nope_dim:])                       # [H, V, C]
    yield f"{b}.attn_output.weight", get(f"{a}.o_proj.weight")


def load_checkpoint(asset_dir: Path = ASSET_DIR) -> tuple[dict[str, np.ndarray], Vocab, Preset]:
    """The checked-in checkpoint: (transformers state dict, vocabulary, preset)."""
    try:
        config = json.loads((asset_dir / "config.json").read_text())
        merges = json.loads((asset_dir / "tokenizer.json").read_text())["merges"]
        with np.load(asset_dir / "checkpoint.npz") as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"{asset_dir}: the trained checkpoint is missing or unreadable ({e})") from None
    p = STDLIB_PRESET.replace(**config["preset"])
    return state, vocab_from_merges([tuple(m.split(" ")) for m in merges], p.vocab), p


def write_trained_gguf(out: Path, kv_layout: str = "split", asset_dir: Path = ASSET_DIR) -> Path:
    """Export the checkpoint as an F32 GGUF with the project's writer."""
    state, vocab, p = load_checkpoint(asset_dir)
    tensors = dict(gguf_tensors(state, p, kv_layout))
    expected = {s.name: s.shape for s in tensor_specs(p, kv_layout)}
    if {k: v.shape for k, v in tensors.items()} != expected:
        raise ModelFormatError(f"{asset_dir}: the checkpoint does not match the {p.name} layout")
    plan = [PlannedTensor(name, shape, F32) for name, shape in expected.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_streaming(out, lambda w: write_metadata(w, p, kv_layout, vocab), plan, lambda t: tensors[t.name])
    return out


def write_metadata(w: gguf.GGUFWriter, p: Preset, kv_layout: str, vocab: Vocab, file_type: int = 0) -> None:
    add_model_metadata(w, p, kv_layout, file_type, tokenizer=lambda: add_tokenizer(w, kimi_k2_template(), p.vocab, vocab),
                       name=f"{p.name} (trained on the Python standard library)")


def make_trained_model(quant: str, out: str | os.PathLike, kv_layout: str = "split",
                       f32_twin: str | os.PathLike | None = None, asset_dir: Path = ASSET_DIR) -> Path:
    """The trained model at `quant` (llama.cpp's quantizer on the F32 export), plus its F32 twin."""
    from hybrid_runtime.synth.tiny import _check_args, write_quantized

    _check_args(quant, kv_layout)
    out = Path(out)
    return write_quantized(out, quant, lambda path: write_trained_gguf(path, kv_layout, asset_dir), f32_twin)
