"""Metadata against tensors: every tensor the architecture needs is present, with the shape the
metadata implies (expert count, heads, ranks, vocabulary), before any weight is used.

A file whose `expert_count` says 16 while its expert tensors hold 8 would otherwise load and
read past the end of a tensor at the first routed token.
"""

from __future__ import annotations

from collections.abc import Callable

from hybrid_runtime.config import ModelConfig
from hybrid_runtime.errors import ModelFormatError

# one expected tensor: name -> numpy shape (reversed ggml ne); None: optional tensor
Shapes = dict[str, tuple[int, ...]]


def deepseek2_shapes(cfg: ModelConfig, has: Callable[[str], bool]) -> tuple[Shapes, Shapes]:
    """(required, optional) tensors of a deepseek2 model, from its config."""
    D, V = cfg.n_embd, cfg.n_vocab
    required: Shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    optional: Shapes = {"output.weight": (V, D)}
    for il in range(cfg.n_layer):
        b = f"blk.{il}"
        required |= _attention(cfg, b)
        req, opt = _dense(cfg, b) if not cfg.is_moe_layer(il) else _moe(cfg, b, has)
        required |= req
        optional |= opt
    return required, optional


def _attention(cfg: ModelConfig, b: str) -> Shapes:
    D, H, C, R = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope
    qk, v = cfg.qk_nope + R, cfg.v_head
    s: Shapes = {f"{b}.attn_norm.weight": (D,), f"{b}.attn_kv_a_norm.weight": (C,),
                 f"{b}.attn_kv_a_mqa.weight": (C + R, D), f"{b}.attn_output.weight": (D, H * v)}
    if cfg.q_lora_rank:
        Q = cfg.q_lora_rank
        s |= {f"{b}.attn_q_a_norm.weight": (Q,), f"{b}.attn_q_a.weight": (Q, D), f"{b}.attn_q_b.weight": (H * qk, Q)}
    else:
        s[f"{b}.attn_q.weight"] = (H * qk, D)
    if cfg.mla_split:
        s |= {f"{b}.attn_k_b.weight": (H, C, cfg.qk_nope), f"{b}.attn_v_b.weight": (H, v, C)}
    else:
        s[f"{b}.attn_kv_b.weight"] = (H * (cfg.qk_nope + v), C)
    return s


def _dense(cfg: ModelConfig, b: str) -> tuple[Shapes, Shapes]:
    D, F = cfg.n_embd, cfg.n_ff_dense
    return {f"{b}.ffn_norm.weight": (D,), f"{b}.ffn_gate.weight": (F, D), f"{b}.ffn_up.weight": (F, D),
            f"{b}.ffn_down.weight": (D, F)}, {}


def _moe(cfg: ModelConfig, b: str, has: Callable[[str], bool]) -> tuple[Shapes, Shapes]:
    D, E, F = cfg.n_embd, cfg.n_expert, cfg.n_ff_expert
    req: Shapes = {f"{b}.ffn_norm.weight": (D,), f"{b}.ffn_gate_inp.weight": (E, D),
                   f"{b}.ffn_down_exps.weight": (E, D, F)}
    if has(f"{b}.ffn_gate_up_exps.weight"):  # fused gate+up
        req[f"{b}.ffn_gate_up_exps.weight"] = (E, 2 * F, D)
    else:
        req |= {f"{b}.ffn_gate_exps.weight": (E, F, D), f"{b}.ffn_up_exps.weight": (E, F, D)}
    if cfg.n_expert_shared:
        Fs = F * cfg.n_expert_shared
        req |= {f"{b}.ffn_gate_shexp.weight": (Fs, D), f"{b}.ffn_up_shexp.weight": (Fs, D),
                f"{b}.ffn_down_shexp.weight": (D, Fs)}
    return req, {f"{b}.exp_probs_b.bias": (E,)}


SHAPES = {"deepseek2": deepseek2_shapes}


def check_consistency(gf, cfg: ModelConfig) -> None:
    """Raise ModelFormatError naming the file and the first tensor that contradicts the metadata."""
    shapes = SHAPES.get(cfg.arch)
    if shapes is None:
        return
    required, optional = shapes(cfg, gf.has)
    for name, want in required.items():
        if not gf.has(name):
            raise ModelFormatError(f"{gf.path}: tensor {name}, which {cfg.arch} needs, is missing")
    for name, want in (required | optional).items():
        if gf.has(name) and tuple(gf.tensors[name].shape) != want:
            raise ModelFormatError(f"{gf.path}: tensor {name} has shape {list(gf.tensors[name].shape)}, but the "
                                   f"metadata implies {list(want)} ({_which_key(name)})")
    _check_vocab(gf, cfg)


def _which_key(name: str) -> str:
    for part, key in (("_exps", "expert_count, expert_feed_forward_length"), ("gate_inp", "expert_count"),
                      ("probs_b", "expert_count"), ("shexp", "expert_shared_count"), ("token_embd", "vocabulary"),
                      ("output.", "vocabulary"), ("attn_q", "head_count, q_lora_rank, key_length"),
                      ("attn_k", "kv_lora_rank, key_length, head_count"), ("attn_v", "value_length, kv_lora_rank"),
                      ("attn_output", "head_count, value_length"), ("ffn_", "feed_forward_length")):
        if part in name:
            return f"check {key}"
    return "check embedding_length"


def _check_vocab(gf, cfg: ModelConfig) -> None:
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > cfg.n_vocab:
        raise ModelFormatError(f"{gf.path}: the tokenizer has {len(tokens)} tokens, but the embedding only "
                               f"{cfg.n_vocab} rows")
