"""Large-batch (prefill) routed experts: big expert groups go to torch.matmul in bf16, the rest
to the integer kernels.

The two thread pools (Numba's and torch's OpenMP) are never busy at once: the integer kernels run
first for every small group, then torch handles the large groups one expert at a time.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from hybrid_runtime.experts.moe_cpu import (ExpertWeights, Routing, column_slice, check_input,
                                            expert_pairs_forward, group_by_expert, scatter_pairs)
from hybrid_runtime.quant.kernels import dequantize_rows

# Tokens routed to one expert from which dequantize-to-bf16 + torch.matmul beats the integer
# kernels. bench_prefill_threshold() on the 2-core Zen 4 dev box, 2 threads, Kimi K2 expert shapes
# (D 7168, F 2048, Q4_K gate/up, Q6_K down), ms per expert, integer / torch: 32 tokens 22.8 / 83,
# 64 tokens 37.0 / 48.1, 128 tokens 71.3 / 48.9, 256 tokens 149 / 78. The integer path costs
# ~0.57 ms per token, torch ~40 ms (mostly the dequantization) + ~0.15 ms per token: they cross
# near 95 tokens.
TORCH_MIN_TOKENS = 96


def configure_threads(n: int) -> None:
    """Give Numba's and torch's pools the same thread count (call once at load time)."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def _dense_bf16(w: np.ndarray, qtype: QT, e: int) -> torch.Tensor:  # [R, C] bf16
    if w.dtype in (np.float32, np.float16):
        return torch.from_numpy(np.ascontiguousarray(w[e], np.float32)).to(torch.bfloat16)
    return torch.from_numpy(dequantize_rows(qtype, w[e])).to(torch.bfloat16)


def _expert_torch(x: torch.Tensor, experts: ExpertWeights, e: int, f0: int, f1: int) -> torch.Tensor:
    """One expert's FFN for the tokens x bf16 [n, D] -> float32 [n, D]."""
    wg = _dense_bf16(experts.gate[:, f0:f1], experts.gate_type, e)   # [Fs, D]
    wu = _dense_bf16(experts.up[:, f0:f1], experts.up_type, e)       # [Fs, D]
    h = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)              # [n, Fs]
    wd = _dense_bf16(column_slice(experts.down, experts.down_type, f0, f1), experts.down_type, e)  # [D, Fs]
    return (h @ wd.T).float()                                        # [n, D]


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
                    torch_min_tokens: int = TORCH_MIN_TOKENS) -> np.ndarray:
    """Same result as moe_forward (float32 [T, D]), choosing per expert between torch and the kernels."""
    x, f0, f1 = check_input(x, experts, ff_range)
    route = group_by_expert(ids, weights, experts.n_expert)
    big = np.diff(route.group_offsets) >= torch_min_tokens
    y = np.empty((len(route.pair_token), experts.hidden), np.float32)  # [P, D]
    small_route, small_pairs = _subset(route, np.flatnonzero(~big))
    if len(small_pairs):
        y[small_pairs] = expert_pairs_forward(x, small_route, experts, f0, f1)
    for g in np.flatnonzero(big):
        lo, hi = route.group_offsets[g], route.group_offsets[g + 1]
        xt = torch.from_numpy(x[route.pair_token[lo:hi]]).to(torch.bfloat16)
        y[lo:hi] = _expert_torch(xt, experts, int(route.group_expert[g]), f0, f1).numpy()
    return scatter_pairs(out, x.shape[0], route, y)
