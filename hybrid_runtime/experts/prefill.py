"""Large-batch (prefill) routed experts: big expert groups go to the integer panel GEMM
(quant/gemm.py, `int8`) or to torch.matmul in bf16, the rest to the integer row kernels.

The two thread pools (Numba's and torch's OpenMP) are never busy at once: the integer kernels run
first for every small group, then torch handles the large groups one expert at a time.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from hybrid_runtime.experts.moe_cpu import (ExpertWeights, Routing, column_slice, check_input,
                                            expert_pairs_forward, group_by_expert, scatter_pairs)
from hybrid_runtime.quant.bf16 import as_bf16, bf16_buffer, dequantize_bf16, reused_buffer

# Tokens in a batch from which the torch model (oneDNN GEMMs on dequantized weights) beats the
# integer row kernels for the whole layer; the compiled step hands chunks this long to it.
# Measured on the Zen 4 dev box at K2 expert shapes (integer ~0.57 ms per token and expert, the
# old float32 dequantization + torch ~40 ms + 0.15 ms per token: they crossed near 95 tokens).
TORCH_MIN_TOKENS = 96

# Tokens routed to one expert from which dequantizing it straight to bf16 (quant/bf16.py, ~8.5 G
# values/s on 2 threads) + torch's bf16 matmul (AMX/AVX-512 BF16 through oneDNN) beats the integer
# kernels. bench_prefill_threshold(), 2 threads, ms per expert integer / bf16: medium shapes (D 2048,
# F 768) 8 tokens 0.71 / 1.14, 16 tokens 1.30 / 1.20, 64 tokens 4.76 / 1.78; K2 shapes (D 7168,
# F 2048) 16 tokens 9.6 / 9.3, 64 tokens 37.8 / 13.2.
BF16_EXPERT_MIN_TOKENS = 16

# Tokens routed to one expert from which the panel GEMM (one repack of each 16 rows, then 8 tokens
# per pass) beats the row kernels.
INT8_EXPERT_MIN_TOKENS = 8


def configure_threads(n: int) -> None:
    """Give Numba's and torch's pools the same thread count (call once at load time)."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def _expert_torch(x: torch.Tensor, experts: ExpertWeights, e: int, f0: int, f1: int, out: torch.Tensor) -> None:
    """One expert's FFN for the tokens x bf16 [n, D] into out bf16 [n, D]: the weights dequantized
    straight to bf16 into reused buffers, gate and up in one matmul."""
    gate, up = experts.gate[:, f0:f1], experts.up[:, f0:f1]
    fs, d = f1 - f0, experts.hidden
    wgu = bf16_buffer("gate_up", 2 * fs, d)
    dequantize_bf16(experts.gate_type, gate[e], wgu[:fs])
    dequantize_bf16(experts.up_type, up[e], wgu[fs:])
    gu = x @ as_bf16(wgu).T                                          # [n, 2 Fs]
    h = torch.nn.functional.silu(gu[:, :fs]).mul_(gu[:, fs:])        # [n, Fs]
    wd = dequantize_bf16(experts.down_type, column_slice(experts.down, experts.down_type, f0, f1)[e],
                         bf16_buffer("down", d, fs))                 # [D, Fs]
    torch.matmul(h, as_bf16(wd).T, out=out)                          # [n, D]


def _int8_applies(experts: ExpertWeights, f0: int, f1: int) -> bool:
    from hybrid_runtime.quant import gemm

    d, f = experts.hidden, experts.n_ff
    if experts.panels is not None:
        return f0 == 0 and f1 == f
    if not all(a.flags.c_contiguous for a in (experts.gate, experts.up, experts.down)):
        return False
    return f0 == 0 and f1 == f and gemm.supports(experts.gate_type, f, d) and \
        gemm.supports(experts.up_type, f, d) and gemm.supports(experts.down_type, d, f)


def _experts_int8(x: np.ndarray, route: Routing, groups: np.ndarray, experts: ExpertWeights, y: np.ndarray) -> None:
    """The FFN of each expert group through the panel GEMM into y float32 [P, D] (the group's pair
    rows): gate and up on the layer's activations quantized once (Q8_K, or Q8_0 for Q8_0 weights,
    as llama.cpp does), silu(gate) * up quantized again, down."""
    from hybrid_runtime.experts.moe_cpu import _silu_mul
    from hybrid_runtime.quant import gemm

    gate_acts = gemm.quantize_acts(experts.gate_type, x)
    up_acts = gate_acts if gemm.acts_of(experts.up_type) == gemm.acts_of(experts.gate_type) \
        else gemm.quantize_acts(experts.up_type, x)
    f, d = experts.n_ff, experts.hidden
    flat = [np.asarray(a).reshape(-1) for a in (experts.gate, experts.up, experts.down)]
    gstride, ustride, dstride = (a.shape[-1] for a in (experts.gate, experts.up, experts.down))
    sizes = np.diff(route.group_offsets)[groups]
    n_max = int(sizes.max()) if len(sizes) else 0
    gu_all = np.empty((n_max, 2 * f), np.float32)  # reused by every group
    silu_acts = gemm.SiluActs(n_max, f) if gemm.acts_of(experts.down_type) == "Q8_K" else None
    sp = experts.panels
    for g in groups:
        lo, hi = int(route.group_offsets[g]), int(route.group_offsets[g + 1])
        e, tok = int(route.group_expert[g]), route.pair_token[lo:hi]
        gu = gu_all[: hi - lo]
        if sp is not None:  # stored panels: no repack
            gemm.matmul_stored(sp[0], e, gate_acts, tok, gu, 0)
            gemm.matmul_stored(sp[1], e, up_acts, tok, gu, f)
        else:
            gemm.matmul(experts.gate_type, flat[0], e * f * gstride, gstride, f, d, gate_acts, tok, gu, 0)
            gemm.matmul(experts.up_type, flat[1], e * f * ustride, ustride, f, d, up_acts, tok, gu, f)
        h8 = silu_acts(gu) if silu_acts is not None \
            else gemm.quantize_acts(experts.down_type, _silu_mul(gu[:, :f], gu[:, f:]))
        own = np.arange(hi - lo, dtype=np.int64)
        if sp is not None:
            gemm.matmul_stored(sp[2], e, h8, own, y[lo:hi], 0)
        else:
            gemm.matmul(experts.down_type, flat[2], e * d * dstride, dstride, d, f, h8, own, y[lo:hi], 0)


def _subset(route: Routing, groups: np.ndarray) -> tuple[Routing, np.ndarray]:
    """The routing restricted to some groups, and the indices of its pairs in the full routing."""
    sizes = np.diff(route.group_offsets)[groups]
    offsets = np.zeros(len(groups) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    pairs = np.concatenate([np.arange(route.group_offsets[g], route.group_offsets[g + 1]) for g in groups]) \
        if len(groups) else np.zeros(0, np.int64)
    sub = Routing(route.group_expert[groups], offsets, route.pair_token[pairs], route.pair_weight[pairs],
                  route.pair_slot[pairs])
    return sub, pairs


def prefill_forward(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: ExpertWeights, *,
                    ff_range: tuple[int, int] | None = None, out: np.ndarray | None = None,
                    torch_min_tokens: int = BF16_EXPERT_MIN_TOKENS, int8: bool = False,
                    int8_min_tokens: int = INT8_EXPERT_MIN_TOKENS) -> np.ndarray:
    """Same result as moe_forward (float32 [T, D]), choosing per expert between the panel GEMM
    (`int8`, where the types have it) or torch bf16, and the row kernels."""
    x, f0, f1 = check_input(x, experts, ff_range)
    route = group_by_expert(ids, weights, experts.n_expert)
    if not len(route.pair_token):  # every pair has weight 0
        return out if out is not None else np.zeros_like(x)
    if int8 and _int8_applies(experts, f0, f1):
        # stored panels take every group (no repack to amortize; the raw blocks are not resident)
        big = np.diff(route.group_offsets) >= (1 if experts.panels is not None else int8_min_tokens)
        # reused from layer to layer: a fresh 32 MB array per layer (512 tokens x 8 pairs x 2048)
        # took its page faults inside the down projection's kernel (Q6_K down 156 -> 229 GMAC/s)
        y = reused_buffer("pairs", len(route.pair_token), experts.hidden, np.float32)
        if (~big).any():
            small_route, small_pairs = _subset(route, np.flatnonzero(~big))
            y[small_pairs] = expert_pairs_forward(x, small_route, experts, f0, f1)
        _experts_int8(x, route, np.flatnonzero(big), experts, y)
        return scatter_pairs(out, x.shape[0], route, y)
    big = np.diff(route.group_offsets) >= torch_min_tokens
    if not big.any():
        return scatter_pairs(out, x.shape[0], route, expert_pairs_forward(x, route, experts, f0, f1))
    small_route, small_pairs = _subset(route, np.flatnonzero(~big))
    row32 = np.full(len(route.pair_token), -1, np.int64)  # the float32 row of each small pair
    row32[small_pairs] = np.arange(len(small_pairs))
    y32 = expert_pairs_forward(x, small_route, experts, f0, f1) if len(small_pairs) \
        else np.zeros((0, experts.hidden), np.float32)
    y16 = bf16_buffer("pairs", len(route.pair_token), experts.hidden)  # big pairs: bf16 rows, exact in float32
    yb = as_bf16(y16)
    xb = torch.from_numpy(x).to(torch.bfloat16)  # rounded once, gathered per expert
    tokens = torch.from_numpy(route.pair_token)
    for g in np.flatnonzero(big):
        lo, hi = route.group_offsets[g], route.group_offsets[g + 1]
        _expert_torch(xb.index_select(0, tokens[lo:hi]), experts, int(route.group_expert[g]), f0, f1, yb[lo:hi])
    return scatter_pairs(out, x.shape[0], route, y32, y16, row32)
