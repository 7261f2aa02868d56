"""Tensor names and shapes of a deepseek2 GGUF, as llama.cpp's loader expects them."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_runtime.synth.presets import Preset

KV_LAYOUTS = ("split", "combined")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]      # numpy order (reversed ggml ne)
    role: str                   # how to initialise it: weight, norm, embed, output, router, bias, expert_*

    @property
    def fan_in(self) -> int:
        return self.shape[-1]


def tensor_specs(p: Preset, kv_layout: str | None = None, tied_output: bool = False) -> list[TensorSpec]:
    """Every tensor of the model in file order."""
    # a tied embedding doubles as the head: draw it at the head's scale
    embed_role = "output" if tied_output else "embed"
    specs = [TensorSpec("token_embd.weight", (p.vocab, p.hidden), embed_role)]
    for il in range(p.n_layer):
        specs += _attention(p, il, kv_layout or p.kv_layout)
        specs += _dense_ffn(p, il) if il < p.n_dense_lead else _moe_ffn(p, il)
    specs.append(TensorSpec("output_norm.weight", (p.hidden,), "norm"))
    if not tied_output:
        specs.append(TensorSpec("output.weight", (p.vocab, p.hidden), "output"))
    return specs


def _attention(p: Preset, il: int, kv_layout: str) -> list[TensorSpec]:
    b, H, D = f"blk.{il}", p.n_head, p.hidden
    qk = p.nope_dim + p.rope_dim
    out = [TensorSpec(f"{b}.attn_norm.weight", (D,), "norm")]
    if p.q_lora:
        out += [
            TensorSpec(f"{b}.attn_q_a_norm.weight", (p.q_lora,), "norm"),
            TensorSpec(f"{b}.attn_q_a.weight", (p.q_lora, D), "weight"),
            TensorSpec(f"{b}.attn_q_b.weight", (H * qk, p.q_lora), "weight"),
        ]
    else:
        out.append(TensorSpec(f"{b}.attn_q.weight", (H * qk, D), "weight"))
    out += [
        TensorSpec(f"{b}.attn_kv_a_norm.weight", (p.kv_lora,), "norm"),
        TensorSpec(f"{b}.attn_kv_a_mqa.weight", (p.kv_lora + p.rope_dim, D), "weight"),
    ]
    if kv_layout == "split":
        out += [
            TensorSpec(f"{b}.attn_k_b.weight", (H, p.kv_lora, p.nope_dim), "k_b"),
            TensorSpec(f"{b}.attn_v_b.weight", (H, p.v_dim, p.kv_lora), "weight"),
        ]
    elif kv_layout == "combined":
        out.append(TensorSpec(f"{b}.attn_kv_b.weight", (H * (p.nope_dim + p.v_dim), p.kv_lora), "weight"))
    else:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    out.append(TensorSpec(f"{b}.attn_output.weight", (D, H * p.v_dim), "weight"))
    return out


def _dense_ffn(p: Preset, il: int) -> list[TensorSpec]:
    b, D, F = f"blk.{il}", p.hidden, p.dense_ff
    return [
        TensorSpec(f"{b}.ffn_norm.weight", (D,), "norm"),
        TensorSpec(f"{b}.ffn_gate.weight", (F, D), "weight"),
        TensorSpec(f"{b}.ffn_up.weight", (F, D), "weight"),
        TensorSpec(f"{b}.ffn_down.weight", (D, F), "weight"),
    ]


def _moe_ffn(p: Preset, il: int) -> list[TensorSpec]:
    b, D, E, F = f"blk.{il}", p.hidden, p.n_expert, p.expert_ff
    Fs = F * p.n_shared
    out = [
        TensorSpec(f"{b}.ffn_norm.weight", (D,), "norm"),
        TensorSpec(f"{b}.ffn_gate_inp.weight", (E, D), "router"),
    ]
    if p.probs_bias:
        out.append(TensorSpec(f"{b}.exp_probs_b.bias", (E,), "bias"))
    out += [
        TensorSpec(f"{b}.ffn_gate_exps.weight", (E, F, D), "expert_gate"),
        TensorSpec(f"{b}.ffn_up_exps.weight", (E, F, D), "expert_up"),
        TensorSpec(f"{b}.ffn_down_exps.weight", (E, D, F), "expert_down"),
    ]
    if p.n_shared:
        out += [
            TensorSpec(f"{b}.ffn_gate_shexp.weight", (Fs, D), "weight"),
            TensorSpec(f"{b}.ffn_up_shexp.weight", (Fs, D), "weight"),
            TensorSpec(f"{b}.ffn_down_shexp.weight", (D, Fs), "weight"),
        ]
    return out
