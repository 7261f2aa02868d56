"""Routed experts split between the GPU (hot-expert cache, or whole layers) and the CPU kernels.

Per MoE layer and step: the routed (token, expert) pairs whose expert is resident on the GPU
are computed there; the rest go to the CPU kernel in the one worker thread while the GPU
works (the model computes the shared expert meanwhile); `wait()` adds the two. The only host
sync of the layer is the download of ids / weights / hidden for the CPU share.

Large prefill batches may instead run every pair on the GPU (PrefillPolicy): cached experts from
their slots, the others streamed through the prefill ring (experts/stream.py), which then starts
uploading layer L+1's likely experts while layer L still computes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_runtime.experts.backends import FloatExperts
from hybrid_runtime.experts.gpu_cache import GpuExpertCache, RoutingRecorder
from hybrid_runtime.experts.stream import ExpertStream, expected_distinct
from hybrid_runtime.quant.act_quant import round_activations
from hybrid_runtime.quant.torch_dequant import dequantize
from hybrid_runtime.weights.gguf_file import TensorRef

CpuShare = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (x [T,D], ids [T,K], w [T,K]) -> [T,D]
Raw3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Prefill offload pays when the CPU would compute the layer's CPU pairs for longer than PCIe
# takes to upload the distinct experts they touch:
#     cpu_s  = pairs * 6 * D * F / CPU_FLOPS            (3 matrices, 2 flops per multiply-add)
#     pcie_s = distinct * expert_bytes / PCIE_BYTES_PER_S
# Kimi K2: 6 * 7168 * 2048 = 88 MFLOP per pair, 44 us at 2 TFLOP/s; one Q4_K/Q6_K expert
# (28.5 MB) takes 1.14 ms on PCIe 4 x16 (25 GB/s), i.e. ~26 routed pairs per distinct expert.
# A 512-token batch (4,096 pairs, ~all 384 experts): CPU 180 ms against PCIe 438 ms -> stay on
# the CPU; from ~1,250 tokens, or with PCIe 5 (~50 GB/s) from ~600, the GPU wins.
CPU_FLOPS = 2.0e12
PCIE_BYTES_PER_S = 25.0e9
PREFILL_MIN_TOKENS = 64  # below this the batch is decode-like: never offload

_WORKER: ThreadPoolExecutor | None = None


def cpu_worker() -> ThreadPoolExecutor:
    """The one thread that runs CPU expert kernels (the kernels themselves are parallel)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-experts")
    return _WORKER


@dataclass(slots=True)
class PrefillPolicy:
    cpu_flops: float = CPU_FLOPS
    pcie_bytes_per_s: float = PCIE_BYTES_PER_S
    min_tokens: int = PREFILL_MIN_TOKENS

    def offload(self, n_tokens: int, n_pairs: int, n_distinct: int, flops_per_pair: float, expert_bytes: int) -> bool:
        if n_tokens < self.min_tokens or n_pairs == 0:
            return False
        return n_pairs * flops_per_pair / self.cpu_flops > n_distinct * expert_bytes / self.pcie_bytes_per_s


def float_cpu_share(refs: tuple[TensorRef, TensorRef, TensorRef]) -> CpuShare:
    """Exact float32 CPU experts (the reference path); pairs with weight 0 contribute nothing."""
    experts = FloatExperts(*refs)

    def run(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        keep = w != 0
        ids_t = torch.from_numpy(np.where(keep, ids, -1))
        out = torch.zeros(x.shape, dtype=torch.float32)
        h = torch.from_numpy(x)
        wt = torch.from_numpy(w)
        for e in np.unique(ids[keep]).tolist():
            tok, slot = (ids_t == e).nonzero(as_tuple=True)
            gate, up, down = experts.weights(e)
            y = (F.silu(h[tok] @ gate.T) * (h[tok] @ up.T)) @ down.T
            out.index_add_(0, tok, y * wt[tok, slot, None])
        return out.numpy()

    return run


def quant_cpu_share(refs: tuple[TensorRef, TensorRef, TensorRef]) -> CpuShare | None:
    """The Numba kernels of experts/moe_cpu.py on the raw blocks, or None while they are absent.

    Pairs resident on the GPU arrive with weight 0: moe_forward's grouping drops them.
    """
    try:
        from hybrid_runtime.experts import moe_cpu
    except ImportError:
        return None
    gate, up, down = refs
    experts = moe_cpu.ExpertWeights(gate.data, up.data, down.data, gate.ggml_type, up.ggml_type, down.ggml_type,
                                    n_expert=gate.shape[0], n_ff=gate.shape[1], hidden=gate.shape[2])

    def run(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        return moe_cpu.moe_forward(x, ids, w, experts)

    return run


def swiglu_raw(x: torch.Tensor, raw: Raw3, types: tuple[int, int, int], dtype: torch.dtype,
               round_act: bool = False) -> torch.Tensor:
    """x [t, D] through one expert stored as raw blocks (dequantized on use) -> [t, D] float32.

    round_act: activations rounded as llama.cpp's CPU kernels do (x for gate/up, the product for down).
    """
    gate, up, down = (dequantize(r, q, dtype) for r, q in zip(raw, types))  # [F, D], [F, D], [D, F]
    xg = (round_activations(x, types[0]) if round_act else x).to(dtype)
    xu = (round_activations(x, types[1]) if round_act else x).to(dtype)
    mid = F.silu(xg @ gate.T) * (xu @ up.T)  # [t, F]
    if round_act:
        mid = round_activations(mid.float(), types[2]).to(dtype)
    return (mid @ down.T).float()


class HybridHandle:
    __slots__ = ("gpu_out", "future", "owner")

    def __init__(self, gpu_out: torch.Tensor, future: Future | None, owner: "HybridExperts"):
        self.gpu_out, self.future, self.owner = gpu_out, future, owner

    def wait(self) -> torch.Tensor:
        out = self.gpu_out
        if self.future is not None:
            cpu = torch.from_numpy(self.future.result())
            out = out + cpu.to(out.device, non_blocking=True)
        self.owner.after_wait()
        return out


class HybridExperts:
    """One MoE layer's routed experts: GPU-resident ones (cache slots or the whole layer) + CPU."""

    def __init__(self, layer: int, refs: tuple[TensorRef, TensorRef, TensorRef], cpu_share: CpuShare,
                 device: torch.device, dtype: torch.dtype, cache: GpuExpertCache | None = None,
                 layer_on_gpu: Raw3 | None = None, recorder: RoutingRecorder | None = None,
                 prefill: PrefillPolicy | None = None, speculate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 round_act: bool = False, stream: ExpertStream | None = None):
        self.layer, self.refs, self.cpu_share = layer, refs, cpu_share
        self.round_act = round_act
        self.device, self.dtype = torch.device(device), dtype
        self.cache, self.layer_on_gpu, self.recorder = cache, layer_on_gpu, recorder
        self.prefill, self.speculate = prefill or PrefillPolicy(), speculate
        self.stream = stream  # the prefill ring; None: no offload (no room for it, or no GPU)
        self.n_expert = int(refs[0].shape[0])
        self.types = tuple(int(r.ggml_type) for r in refs)
        self.expert_bytes = sum(int(r.data[0].nbytes) for r in refs)
        self.flops_per_pair = 6.0 * refs[0].shape[1] * refs[0].shape[2]
        self.last_split = (0, 0)  # (pairs on the GPU, pairs on the CPU) of the latest step
        self._hint: np.ndarray | None = None

    def submit(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> HybridHandle:
        """h [T, D], ids [T, K], weights [T, K] on the GPU device."""
        guess_t = self.speculate(h) if self.speculate is not None else None  # [T, K] on the device
        ids_np, w_np, x_np, guess = self._download(h, ids, weights, guess_t)  # the layer's one host sync
        if self.recorder is not None:
            self.recorder.record(self.layer, ids_np)
        slots = self._resident(ids_np)  # [T, K], -1: on the CPU
        on_cpu = slots < 0
        n_cpu = int(on_cpu.sum())
        if n_cpu and self._offload(ids_np, on_cpu):
            self.last_split = (ids_np.size, 0)
            return HybridHandle(self._gpu_all(h, ids_np, weights, slots, guess), None, self)
        future = self._start_cpu(x_np, ids_np, w_np, on_cpu) if n_cpu else None
        self.last_split = (ids_np.size - n_cpu, n_cpu)
        self._hint = guess if self.cache is not None else None
        return HybridHandle(self._gpu_part(h, ids_np, weights, slots), future, self)

    def describe(self) -> str:
        cpu = "Numba kernels" if self.round_act else "float32 (reference)"
        return f"CPU {cpu} + GPU {'cache' if self.cache is not None else 'layer' if self.layer_on_gpu is not None else 'none'}"

    def after_wait(self) -> None:
        if self.cache is None:
            return
        self.cache.after_layer(self.layer)
        if self._hint is not None:
            self.cache.after_layer(self.layer + 1, extra=self._hint)
            self._hint = None

    # -- the split --------------------------------------------------------------------------------
    def _resident(self, ids_np: np.ndarray) -> np.ndarray:
        if self.layer_on_gpu is not None:
            return ids_np.copy()  # every expert lives on the GPU: its "slot" is its id
        if self.cache is None:
            return np.full(ids_np.shape, -1, dtype=np.int64)
        self.cache.observe(self.layer, ids_np)
        return self.cache.lookup(self.layer, ids_np)

    def _raw(self, slot: int) -> Raw3:
        if self.layer_on_gpu is not None:
            return tuple(t[slot] for t in self.layer_on_gpu)
        return self.cache.expert(self.layer, slot)

    def _download(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, guess: torch.Tensor | None):
        """One device->host copy of [ids | weights | guess | h] (ids exact in float32 below 2**24)."""
        K = ids.shape[1]
        G = 0 if guess is None else guess.shape[1]
        parts = [ids.float(), weights.float()] + ([guess.float()] if guess is not None else []) + [h.float()]
        packed = torch.cat(parts, dim=1)  # [T, 2K + G + D]
        if packed.device.type == "cpu":
            host = packed
        else:
            host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(packed)  # blocking: the sync
        a = host.numpy()
        guess_np = a[:, 2 * K : 2 * K + G].astype(np.int64) if guess is not None else None
        return a[:, :K].astype(np.int64), np.ascontiguousarray(a[:, K : 2 * K]), np.ascontiguousarray(a[:, 2 * K + G :]), guess_np

    def _start_cpu(self, x: np.ndarray, ids_np: np.ndarray, w: np.ndarray, on_cpu: np.ndarray) -> Future:
        w = np.where(on_cpu, w, 0.0).astype(np.float32)
        return cpu_worker().submit(self.cpu_share, x, ids_np, w)

    def _gpu_part(self, h: torch.Tensor, ids_np: np.ndarray, weights: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        """The pairs whose expert is resident (slots >= 0), from their slots -> [T, D]."""
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # [T, D]
        for s in np.unique(slots[slots >= 0]).tolist():
            tok, k = np.nonzero(slots == s)
            tok_t, k_t = torch.as_tensor(tok, device=h.device), torch.as_tensor(k, device=h.device)
            y = swiglu_raw(h[tok_t], self._raw(s), self.types, self.dtype, self.round_act)
            out.index_add_(0, tok_t, y * weights[tok_t, k_t, None].float())
        return out

    # -- prefill offload --------------------------------------------------------------------------
    def _offload(self, ids_np: np.ndarray, on_cpu: np.ndarray) -> bool:
        if self.stream is None:
            return False
        distinct = np.unique(ids_np[on_cpu]).size
        return self.prefill.offload(ids_np.shape[0], int(on_cpu.sum()), distinct, self.flops_per_pair, self.expert_bytes)

    def _next_offloads(self, T: int, K: int) -> bool:
        """Would the next streamed layer offload this batch too (its expected distinct experts, its sizes)?"""
        nxt = self.stream.next_layer(self.layer)
        if nxt is None:
            return False
        distinct = round(expected_distinct(T, K, self.n_expert))
        return self.prefill.offload(T, T * K, distinct, self.flops_per_pair, self.stream.layouts[nxt].n_bytes)

    def _gpu_all(self, h: torch.Tensor, ids_np: np.ndarray, weights: torch.Tensor, slots: np.ndarray,
                 guess: np.ndarray | None) -> torch.Tensor:
        """Every routed pair on the GPU: resident experts from their slots, the rest through the ring;
        layer L+1's likely experts queue behind them, so each buffer this layer frees is refilled."""
        out = self._gpu_part(h, ids_np, weights, slots)
        missing = np.unique(ids_np[slots < 0]).tolist()
        order = self.stream.begin_layer(self.layer, missing)
        if self._next_offloads(*ids_np.shape):
            self.stream.predict_next(self.layer, ids_np.shape[0], ids_np.shape[1], self.n_expert, guess)
        for e in order:
            raw, i = self.stream.take(self.layer, e)
            tok, k = np.nonzero(ids_np == e)
            tok_t, k_t = torch.as_tensor(tok, device=h.device), torch.as_tensor(k, device=h.device)
            y = swiglu_raw(h[tok_t], raw, self.types, self.dtype, self.round_act)
            out.index_add_(0, tok_t, y * weights[tok_t, k_t, None].float())
            self.stream.release(self.layer, e, i)
        return out
