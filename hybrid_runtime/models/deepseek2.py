"""deepseek2: Kimi K2 / K2-Thinking / K2.5 text, DeepSeek-V3 / R1 / V2 / V2-Lite.

MLA attention over a compressed latent cache (absorbed weights), optional q-LoRA, leading
dense layers, then MoE layers (routed experts + shared experts).

Shape legend: T = new tokens, L = cached + new tokens, D = hidden, H = heads,
C = kv_lora_rank, R = rope dims, N = nope dims, V = v head dims, E = experts, K = experts used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybrid_runtime.config import GATING_SIGMOID, GATING_SOFTMAX, ModelConfig
from hybrid_runtime.engine.kv_cache import LatentCache
from hybrid_runtime.errors import ModelFormatError, UnsupportedModelError
from hybrid_runtime.layers import Rope, rms_norm, swiglu_ffn
from hybrid_runtime.weights.gguf_file import GGUFModelFile

ARCH = "deepseek2"
QUERY_BLOCK = 128  # new tokens per attention block in a long chunk
# From this many new tokens a chunk attends in the decompressed form (per head k = latent . W_kb,
# v = latent . W_vb for the visible cache rows, then q . k over nope + rope dims and p . v): 320
# multiply-adds per (token, head, position) instead of the absorbed form's 1,088, for the price of
# decompressing the rows once (256 x 512 per row and head). 512 tokens on medium-12L: 15.5 against
# 24.7 ms a layer. Only where the absorbed matrices run in bf16 (they provide the dense weights).
DECOMPRESS_MIN_TOKENS = 192


def read_config(gf: GGUFModelFile) -> ModelConfig:
    """Build the typed config from `deepseek2.*` metadata (see design.md §3.1)."""
    p = f"{ARCH}."
    g = gf.get
    n_layer = int(g(p + "block_count"))
    n_head = int(g(p + "attention.head_count"))
    kv_lora = int(g(p + "attention.kv_lora_rank"))
    rope = int(g(p + "rope.dimension_count"))
    mla_split = p + "attention.key_length_mla" in gf.metadata and p + "attention.value_length_mla" in gf.metadata
    if mla_split:
        head_k = int(g(p + "attention.key_length_mla"))
        v_head = int(g(p + "attention.value_length_mla"))
    else:
        head_k = int(g(p + "attention.key_length"))
        v_head = int(g(p + "attention.value_length"))
    vocab = g(p + "vocab_size", None)
    if vocab is None:
        tokens = g("tokenizer.ggml.tokens", None)
        vocab = len(tokens) if tokens else gf.tensor("token_embd.weight").shape[0]
    scaling = str(g(p + "rope.scaling.type", "none"))
    factor = float(g(p + "rope.scaling.factor", 1.0) or 1.0)
    cfg = ModelConfig(
        arch=ARCH,
        name=str(g("general.name", "") or ""),
        n_layer=n_layer,
        n_embd=int(g(p + "embedding_length")),
        n_head=n_head,
        n_vocab=int(vocab),
        n_ctx_train=int(g(p + "context_length", 4096)),
        rms_eps=float(g(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        q_lora_rank=0 if gf.has("blk.0.attn_q.weight") else int(g(p + "attention.q_lora_rank", 0)),
        kv_lora_rank=kv_lora,
        qk_nope=head_k - rope,
        qk_rope=rope,
        v_head=v_head,
        mla_split=mla_split,
        n_dense_lead=int(g(p + "leading_dense_block_count", 0)),
        n_ff_dense=int(g(p + "feed_forward_length", 0)),
        n_ff_expert=int(g(p + "expert_feed_forward_length", 0)),
        n_expert=int(g(p + "expert_count", 0)),
        n_expert_used=int(g(p + "expert_used_count", 0)),
        n_expert_shared=int(g(p + "expert_shared_count", 0)),
        n_group=int(g(p + "expert_group_count", 1) or 1),
        n_group_used=int(g(p + "expert_group_used_count", 1) or 1),
        gating=int(g(p + "expert_gating_func", GATING_SOFTMAX) or GATING_SOFTMAX),
        weights_norm=bool(g(p + "expert_weights_norm", False)),
        weights_scale=float(g(p + "expert_weights_scale", 1.0) or 1.0),
        rope_base=float(g(p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_factor=factor,
        rope_orig_ctx=int(g(p + "rope.scaling.original_context_length", 0) or g(p + "context_length", 4096)),
        yarn_log_mul=float(g(p + "rope.scaling.yarn_log_multiplier", 0.0)) / 0.1,
        tied_output=not gf.has("output.weight"),
    )
    if cfg.gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise UnsupportedModelError(f"expert gating function {cfg.gating} is not supported (1 softmax, 2 sigmoid)")
    if cfg.rope_scaling not in ("none", "yarn", "linear"):
        raise UnsupportedModelError(f"rope scaling {cfg.rope_scaling!r} is not supported")
    if cfg.qk_nope <= 0:
        raise ModelFormatError(f"key length {head_k} is not larger than the rope dimension {rope}")
    return cfg


@dataclass(slots=True)
class Routing:
    ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] float32


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig) -> Routing:
    """Select experts: top-k on (probs + bias) within the best groups; weights are the unbiased probs."""
    probs = torch.sigmoid(logits) if cfg.gating == GATING_SIGMOID else torch.softmax(logits, dim=-1)  # [T, E]
    select = probs + bias if bias is not None else probs
    if cfg.n_group > 1:
        groups = select.view(select.shape[0], cfg.n_group, -1)  # [T, G, E/G]
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = group_score.topk(cfg.n_group_used, dim=-1).indices  # [T, Gk]
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        select = groups.masked_fill(mask[:, :, None], float("-inf")).view_as(select)
    ids = select.topk(cfg.n_expert_used, dim=-1).indices  # [T, K]
    weights = probs.gather(1, ids)
    if cfg.weights_norm:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    if cfg.weights_scale not in (0.0, 1.0):
        weights = weights * cfg.weights_scale
    return Routing(ids, weights)


class Attention:
    """MLA with absorbed weights: the cache holds the normed latent c [L, C] and roped k_pe [L, R]."""

    def __init__(self, cfg: ModelConfig, w, layer: int, rope: Rope):
        self.cfg, self.rope, self.layer = cfg, rope, layer
        b = f"blk.{layer}."
        if cfg.q_lora_rank:
            self.wq_a, self.wq_b = w.linear(b + "attn_q_a.weight"), w.linear(b + "attn_q_b.weight")
            self.q_a_norm = w.vector(b + "attn_q_a_norm.weight")
        else:
            self.wq = w.linear(b + "attn_q.weight")
        self.wkv_a = w.linear(b + "attn_kv_a_mqa.weight")
        self.kv_a_norm = w.vector(b + "attn_kv_a_norm.weight")
        self.wk_b, self.wv_b = self._absorbed(w, b)  # per head: N -> C, C -> V
        self.wo = w.linear(b + "attn_output.weight")
        # long prefill chunks may attend in bf16 where the absorbed matrices run in bf16
        self.chunk_dtype = getattr(self.wk_b, "chunk_dtype", lambda n_tokens: None)

    def _absorbed(self, w, b: str):
        c = self.cfg
        if c.mla_split:
            return w.head_linear(b + "attn_k_b.weight"), w.head_linear(b + "attn_v_b.weight")
        kv_b = w.matrix(b + "attn_kv_b.weight").view(c.n_head, c.qk_nope + c.v_head, c.kv_lora_rank)
        k_b = kv_b[:, : c.qk_nope].transpose(1, 2).contiguous()  # [H, C, N]
        return w.head_linear_from(k_b), w.head_linear_from(kv_b[:, c.qk_nope :].contiguous())

    def __call__(self, h: torch.Tensor, pos: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        c = self.cfg
        T = h.shape[0]
        if c.q_lora_rank:
            q = self.wq_b(rms_norm(self.wq_a(h), self.q_a_norm, c.rms_eps))
        else:
            q = self.wq(h)
        q = q.view(T, c.n_head, c.head_dim_qk)
        q_nope, q_pe = q[..., : c.qk_nope], self.rope(q[..., c.qk_nope :], pos)  # [T, H, N], [T, H, R]
        kv = self.wkv_a(h)  # [T, C + R]
        latent = rms_norm(kv[:, : c.kv_lora_rank], self.kv_a_norm, c.rms_eps)  # [T, C]
        k_pe = self.rope(kv[:, None, c.kv_lora_rank :], pos)[:, 0]  # [T, R]
        lat_all, pe_all = cache.append(self.layer, latent, k_pe)  # [L, C], [L, R] on the latents' device
        dt = self.chunk_dtype(T)
        if dt is not None and T >= DECOMPRESS_MIN_TOKENS and hasattr(self.wk_b, "dense_weight"):
            o = self._attend_decompressed(q_nope.to(dt), q_pe.to(dt), lat_all, pe_all, pos, dt)  # [T, H, V]
            return self.wo(o.reshape(T, c.n_head * c.v_head))
        q_abs = self.wk_b(q_nope)  # [T, H, C]
        if dt is not None:
            q_abs, q_pe, lat_all, pe_all = q_abs.to(dt), q_pe.to(dt), lat_all.to(dt), pe_all.to(dt)
        # query blocks see only the cache rows up to their last position (causal): ~half the work
        o_lat = torch.cat([self._attend(q_abs[t0: t0 + QUERY_BLOCK], q_pe[t0: t0 + QUERY_BLOCK], lat_all, pe_all,
                                        pos[t0: t0 + QUERY_BLOCK]) for t0 in range(0, T, QUERY_BLOCK)])
        o = self.wv_b(o_lat)  # [T, H, V] (in dt: the absorbed matrices run in it)
        return self.wo(o.reshape(T, c.n_head * c.v_head))

    def _attend_decompressed(self, q_nope, q_pe, lat_all, pe_all, pos, dt):  # -> o [T, H, V]
        c = self.cfg
        L = int(pos[-1]) + 1
        lat, pe = lat_all[:L].to(dt), pe_all[:L].to(dt)
        k = torch.einsum("lc,hcn->hln", lat, self.wk_b.dense_weight("attn_k_b"))  # [H, L, N]
        k = torch.cat([k, pe[None].expand(c.n_head, L, c.qk_rope)], dim=-1)      # [H, L, N + R]
        v = torch.einsum("lc,hvc->hlv", lat, self.wv_b.dense_weight("attn_v_b"))  # [H, L, V]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)                    # [H, T, N + R]
        out = []
        for t0 in range(0, q.shape[1], QUERY_BLOCK):  # causal: a block sees the rows up to its last position
            p = pos[t0: t0 + QUERY_BLOCK]
            n = int(p[-1]) + 1
            scores = torch.bmm(q[:, t0: t0 + QUERY_BLOCK], k[:, :n].transpose(1, 2)) * c.attn_scale  # [H, t, n]
            causal = (torch.arange(n)[None, :] > p[:, None]).to(scores.device)
            probs = torch.softmax(scores.masked_fill(causal[None], float("-inf")), dim=-1)
            out.append(torch.bmm(probs, v[:, :n]))                              # [H, t, V]
        return torch.cat(out, dim=1).transpose(0, 1)

    def _attend(self, q_abs, q_pe, lat_all, pe_all, pos):  # -> o_lat [t, H, C]
        L = int(pos[-1]) + 1
        lat, pe = lat_all[:L], pe_all[:L]
        scores = torch.einsum("thc,lc->thl", q_abs, lat) + torch.einsum("thr,lr->thl", q_pe, pe)
        scores = scores * self.cfg.attn_scale
        causal = (torch.arange(L)[None, :] > pos[:, None]).to(scores.device)  # [t, L]
        probs = torch.softmax(scores.masked_fill(causal[:, None, :], float("-inf")), dim=-1)  # [t, H, L]
        return torch.einsum("thl,lc->thc", probs, lat)  # [t, H, C]


class DenseFFN:
    def __init__(self, w, prefix: str, suffix: str = ""):
        self.gate = w.linear(f"{prefix}ffn_gate{suffix}.weight")
        self.up = w.linear(f"{prefix}ffn_up{suffix}.weight")
        self.down = w.linear(f"{prefix}ffn_down{suffix}.weight")

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return swiglu_ffn(h, self.gate, self.up, self.down)


class MoE:
    """Router + routed experts (an injected backend, wherever they live) + shared experts."""

    def __init__(self, cfg: ModelConfig, w, layer: int):
        b = f"blk.{layer}."
        self.cfg = cfg
        self.router = w.matrix(b + "ffn_gate_inp.weight")  # [E, D]
        self.bias = w.vector(b + "exp_probs_b.bias") if w.has(b + "exp_probs_b.bias") else None
        self.experts = w.experts(layer)
        self.shared = DenseFFN(w, b, "_shexp") if cfg.n_expert_shared else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        r = route(h @ self.router.T, self.bias, self.cfg)
        routed = self.experts.submit(h, r.ids, r.weights)  # runs while the shared expert computes
        shared = self.shared(h) if self.shared is not None else None
        out = routed.wait()  # [T, D]
        return out + shared if shared is not None else out


class DeepSeek2:
    """The whole network; `forward` appends tokens to a cache and returns the final hidden states."""

    def __init__(self, cfg: ModelConfig, w, rope: Rope):
        self.cfg = cfg
        self.embed = w.embedding("token_embd.weight")
        self.attn = [Attention(cfg, w, i, rope) for i in range(cfg.n_layer)]
        self.attn_norm = [w.vector(f"blk.{i}.attn_norm.weight") for i in range(cfg.n_layer)]
        self.ffn_norm = [w.vector(f"blk.{i}.ffn_norm.weight") for i in range(cfg.n_layer)]
        self.ffn = [MoE(cfg, w, i) if cfg.is_moe_layer(i) else DenseFFN(w, f"blk.{i}.") for i in range(cfg.n_layer)]
        self.out_norm = w.vector("output_norm.weight")
        self.head = w.linear("token_embd.weight" if cfg.tied_output else "output.weight")

    def new_cache(self, capacity: int) -> LatentCache:
        c = self.cfg
        return LatentCache(c.n_layer, c.kv_lora_rank, c.qk_rope, capacity)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """tokens [T] at positions cache.n_tokens.. -> final normed hidden [T, D]; the cache grows by T."""
        return rms_norm(self.hidden(tokens, cache), self.out_norm, self.cfg.rms_eps)

    @torch.inference_mode()
    def hidden(self, tokens: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """The residual stream after the last layer [T, D] (before the final norm)."""
        eps = self.cfg.rms_eps
        pos = torch.arange(cache.n_tokens, cache.n_tokens + tokens.shape[0])
        x = self.embed(tokens)  # [T, D]
        for i in range(self.cfg.n_layer):
            x = x + self.attn[i](rms_norm(x, self.attn_norm[i], eps), pos, cache)
            x = x + self.ffn[i](rms_norm(x, self.ffn_norm[i], eps))
        cache.commit(tokens.shape[0])
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)  # [T, vocab]
