"""The fused routed-expert step on the CPU: gate/up -> silu(gate) * up -> Q8_K -> down -> weighted sum.

Shapes: T tokens, K experts per token, P = T*K (token, expert) pairs sorted by expert into G
groups, D hidden, F expert FFN (Fs = the slice of F this call computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

from hybrid_runtime.errors import HybridError
from hybrid_runtime.quant.floatbits import f32_bits
from hybrid_runtime.quant.kernels import CPU_KERNELS, QuantActs, grouped_matmul, quantize_acts

_FLOAT_TYPES = (QT.F32, QT.F16)


@dataclass(slots=True)
class ExpertWeights:
    """One layer's routed experts as stored in the GGUF (raw blocks, zero-copy views)."""
    gate: np.ndarray  # uint8 [E, F, gate_row_bytes] (or float32/float16 [E, F, D])
    up: np.ndarray    # [E, F, ...]
    down: np.ndarray  # [E, D, ...] (rows of F values)
    gate_type: QT
    up_type: QT
    down_type: QT
    n_expert: int
    n_ff: int
    hidden: int
    panels: tuple | None = None  # (gate, up, down) as quant/gemm.StoredPanels, when the store made them


@dataclass(slots=True)
class Routing:
    """(token, expert) pairs grouped by expert."""
    group_expert: np.ndarray  # [G] int64
    group_offsets: np.ndarray  # [G+1] int64: pairs of group g are group_offsets[g]:group_offsets[g+1]
    pair_token: np.ndarray    # [P] int64
    pair_weight: np.ndarray   # [P] float32
    pair_slot: np.ndarray     # [P] int64: t * K + k, the pair's place in the [T, K] routing
    n_slots: int = -1         # T * K (P is smaller when zero-weight pairs were dropped)


def group_by_expert(ids: np.ndarray, weights: np.ndarray, n_expert: int) -> Routing:
    """Sort the [T, K] routing choices into per-expert groups.

    Pairs of weight exactly 0 are dropped: they contribute nothing (in the hybrid path they are the
    experts another device serves), so the kernels skip them.
    """
    ids = np.asarray(ids, np.int64)
    flat = ids.ravel()
    w = np.asarray(weights, np.float32).ravel()
    zero = w == 0
    if zero.any():
        keep = np.flatnonzero(~zero)
        order = keep[np.argsort(flat[keep], kind="stable")]
    else:
        order = np.argsort(flat, kind="stable")
    experts, counts = np.unique(flat[order], return_counts=True)
    if len(experts) and (experts[0] < 0 or experts[-1] >= n_expert):  # the kernels do not bound-check
        raise HybridError(f"expert ids must lie in [0, {n_expert}), got {experts[0]}..{experts[-1]}.")
    offsets = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Routing(experts.astype(np.int64), offsets, order // ids.shape[1], w[order], order, flat.size)


def _check_range(ff_range, experts: ExpertWeights) -> tuple[int, int]:
    f0, f1 = ff_range if ff_range is not None else (0, experts.n_ff)
    aligned = f0 % 256 == 0 and (f1 % 256 == 0 or f1 == experts.n_ff)
    if not (0 <= f0 < f1 <= experts.n_ff) or not aligned:
        raise HybridError(f"ff_range {ff_range} must be 256-aligned inside [0, {experts.n_ff}].")
    return f0, f1


def column_slice(w: np.ndarray, qtype: QT, c0: int, c1: int) -> np.ndarray:
    """Columns c0:c1 of a [E, R, row] weight: a byte slice for quantized rows."""
    if qtype in _FLOAT_TYPES and w.dtype != np.uint8:
        return w[:, :, c0:c1]
    values, nbytes = GGML_QUANT_SIZES[qtype]
    if c0 % values or (c1 - c0) % values:
        raise HybridError(f"columns {c0}:{c1} do not fall on {qtype.name} block boundaries.")
    return w[:, :, c0 // values * nbytes: c1 // values * nbytes]


def _dense_expert(w: np.ndarray, qtype: QT, e: int) -> np.ndarray:  # -> float32 [R, C]
    if w.dtype in (np.float32, np.float16):
        return np.asarray(w[e], np.float32)
    return dequantize(np.ascontiguousarray(w[e]), qtype).astype(np.float32, copy=False)


def _project(w: np.ndarray, qtype: QT, route: Routing, x: np.ndarray, pair_rows: np.ndarray,
             acts: dict[str, QuantActs]) -> np.ndarray:
    """y[p] = W[expert of p] . x[pair_rows[p]] for all pairs -> float32 [P, R]."""
    out = np.empty((len(route.pair_token), w.shape[1]), np.float32)
    spec = CPU_KERNELS.get(qtype)
    if spec is not None and w.dtype == np.uint8:
        if spec.act not in acts:
            acts[spec.act] = quantize_acts(spec.act, x)
        return grouped_matmul(spec, w, route.group_expert, route.group_offsets, pair_rows, acts[spec.act], out)
    for g, e in enumerate(route.group_expert):  # dequantize fallback: any type gguf can read
        lo, hi = route.group_offsets[g], route.group_offsets[g + 1]
        out[lo:hi] = x[pair_rows[lo:hi]] @ _dense_expert(w, qtype, int(e)).T
    return out


def _fusable(a: np.ndarray, a_type: QT, b: np.ndarray, b_type: QT) -> bool:
    return (a_type == b_type and a_type in CPU_KERNELS and a.dtype == b.dtype == np.uint8
            and a.shape == b.shape and a.strides == b.strides)


def _project_pair(wa: np.ndarray, wb: np.ndarray, qtype: QT, route: Routing, x: np.ndarray,
                  acts: dict[str, QuantActs]) -> tuple[np.ndarray, np.ndarray]:
    """Gate and up of one type in one parallel call -> float32 [P, R] twice."""
    spec = CPU_KERNELS[qtype]
    if spec.act not in acts:
        acts[spec.act] = quantize_acts(spec.act, x)
    out_a = np.empty((len(route.pair_token), wa.shape[1]), np.float32)
    out_b = np.empty_like(out_a)
    grouped_matmul(spec, wa, route.group_expert, route.group_offsets, route.pair_token, acts[spec.act], out_a,
                   w2=wb, out2=out_b)
    return out_a, out_b


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:  # [P, Fs] float32
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
        return (g / (np.float32(1.0) + np.exp(-g))) * u


def expert_pairs_forward(x: np.ndarray, route: Routing, experts: ExpertWeights, f0: int, f1: int) -> np.ndarray:
    """Unweighted expert outputs float32 [P, D] of every (token, expert) pair, FFN slice f0:f1."""
    acts: dict[str, QuantActs] = {}
    gate_w, up_w = experts.gate[:, f0:f1], experts.up[:, f0:f1]
    if _fusable(gate_w, experts.gate_type, up_w, experts.up_type):
        gate, up = _project_pair(gate_w, up_w, experts.gate_type, route, x, acts)                 # [P, Fs] x 2
    else:
        gate = _project(gate_w, experts.gate_type, route, x, route.pair_token, acts)               # [P, Fs]
        up = _project(up_w, experts.up_type, route, x, route.pair_token, acts)                     # [P, Fs]
    h = _silu_mul(gate, up)                                                                        # [P, Fs]
    down_w = column_slice(experts.down, experts.down_type, f0, f1)
    pairs = np.arange(len(route.pair_token), dtype=np.int64)
    return _project(down_w, experts.down_type, route, h, pairs, {})                               # [P, D]


def check_input(x: np.ndarray, experts: ExpertWeights, ff_range) -> tuple[np.ndarray, int, int]:
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != experts.hidden:
        raise HybridError(f"expert input must be [T, {experts.hidden}], got {list(x.shape)}.")
    return x, *_check_range(ff_range, experts)


@numba.njit(cache=True, nogil=True, parallel=True)
def _combine(y, y16, row32, pair_slot, pair_weight, n_tok, k, out, add):
    """out[t] (+)= sum over k of pair_weight[p] * y_p for the pairs p of token t, in slot order;
    y_p is y[row32[p]] (float32) where row32[p] >= 0, else y16[p] (bf16 bits, exact in float32)."""
    pair_of = np.full(n_tok * k, -1, np.int64)
    for p in range(pair_slot.shape[0]):
        pair_of[pair_slot[p]] = p
    D = out.shape[1]
    for t in numba.prange(n_tok):
        acc = np.zeros(D, np.float32)  # per element the same sums as one element at a time, vectorized
        first = True
        for j in range(k):
            p = pair_of[t * k + j]
            if p < 0:
                continue
            r, w = row32[p], pair_weight[p]
            if r >= 0:
                src = y[r]
                if first:
                    for d in range(D):
                        acc[d] = w * src[d]
                else:
                    for d in range(D):
                        acc[d] = acc[d] + w * src[d]
            else:
                for d in range(D):
                    v = w * f32_bits(np.int32(np.int64(y16[p, d]) << 16))
                    acc[d] = v if first else acc[d] + v
            first = False
        row = out[t]
        for d in range(D):
            row[d] = row[d] + acc[d] if add else acc[d]


def scatter_pairs(out: np.ndarray | None, n_tok: int, route: Routing, y: np.ndarray,
                  y16: np.ndarray | None = None, row32: np.ndarray | None = None) -> np.ndarray:
    """out[t] += sum over the K pairs p of token t of pair_weight[p] * y_p (in slot order).

    y_p = y[p] float32 [P, D]; or, given y16 (bf16 bits uint16 [P, D]) and row32 [P], y[row32[p]]
    where row32[p] >= 0 and y16[p] elsewhere."""
    n_slots = route.n_slots if route.n_slots >= 0 else len(route.pair_slot)
    k = n_slots // n_tok if n_tok else 1
    d = y.shape[1] if y16 is None else y16.shape[1]
    target = out if out is not None else np.empty((n_tok, d), np.float32)
    if y16 is None:
        y16, row32 = np.zeros((0, d), np.uint16), np.arange(len(route.pair_slot), dtype=np.int64)
    _combine(np.ascontiguousarray(y, np.float32).reshape(-1, d), y16, row32, route.pair_slot, route.pair_weight,
             n_tok, k, target, out is not None)
    return target


def moe_forward(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: ExpertWeights, *,
                ff_range: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Routed-expert output float32 [T, D] = sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t).

    x float32 [T, D]; ids int [T, K]; weights float32 [T, K]. ff_range=(f0, f1), 256-aligned (or
    ending at F), computes only that slice of the FFN dimension; the outputs of disjoint slices
    sum to the full result. With `out` the result is added into it (and returned). The kernels
    release the GIL, so a GPU thread can run meanwhile.
    """
    x, f0, f1 = check_input(x, experts, ff_range)
    route = group_by_expert(ids, weights, experts.n_expert)
    if not len(route.pair_token):  # every pair has weight 0
        return out if out is not None else np.zeros_like(x)
    return scatter_pairs(out, x.shape[0], route, expert_pairs_forward(x, route, experts, f0, f1))
