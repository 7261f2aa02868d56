"""Routed-expert backends: `submit(h [T, D], ids [T, K], weights [T, K])` returns a handle whose
`wait()` gives [T, D]. The model submits, computes the shared expert, then waits: a backend that
runs elsewhere (CPU worker threads, GPU cache) overlaps with it; a synchronous one is simply done.

- `FloatExperts`: exact float32 path; each expert is dequantized on first use and kept.
- `CpuQuantExperts`: the raw GGUF blocks through the Numba kernels (experts/moe_cpu.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_runtime.quant.act_quant import round_activations
from hybrid_runtime.quant.registry import get_format
from hybrid_runtime.weights.gguf_file import GGUFModelFile, TensorRef
from hybrid_runtime.weights.provider import to_torch


def expert_tensor_names(gf: GGUFModelFile, layer: int) -> list[str]:
    """The file's tensors that hold a layer's routed experts (a fused gate_up is one tensor)."""
    b = f"blk.{layer}."
    names = ["ffn_gate_up_exps"] if gf.has(b + "ffn_gate_up_exps.weight") else ["ffn_gate_exps", "ffn_up_exps"]
    return [f"{b}{n}.weight" for n in names + ["ffn_down_exps"]]


def expert_refs(gf: GGUFModelFile, layer: int) -> tuple[TensorRef, TensorRef, TensorRef]:
    """gate [E, F, D], up [E, F, D], down [E, D, F]; a fused gate_up [E, 2F, D] is split as views."""
    b = f"blk.{layer}."
    down = gf.tensor(b + "ffn_down_exps.weight")
    if gf.has(b + "ffn_gate_up_exps.weight"):
        gu = gf.tensor(b + "ffn_gate_up_exps.weight")
        n_ff = gu.shape[1] // 2
        gate = TensorRef(gu.name + "[gate]", gu.ggml_type, (gu.shape[0], n_ff, gu.shape[2]), gu.data[:, :n_ff], gu.n_bytes // 2, gu.part)
        up = TensorRef(gu.name + "[up]", gu.ggml_type, (gu.shape[0], n_ff, gu.shape[2]), gu.data[:, n_ff:], gu.n_bytes // 2, gu.part)
        return gate, up, down
    return gf.tensor(b + "ffn_gate_exps.weight"), gf.tensor(b + "ffn_up_exps.weight"), down


class Done:
    """The handle of work already finished."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class SyncExperts:
    """Base of backends that compute in the calling thread."""

    def __call__(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def submit(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Done:
        return Done(self(h, ids, weights))


class FloatExperts(SyncExperts):
    """Float32 experts, dequantized lazily per expert.

    round_act=False: the exact reference path. True: llama.cpp's activation rounding (x for gate/up,
    the product for down), the emulation used for types without a CPU kernel.
    """

    def __init__(self, gate: TensorRef, up: TensorRef, down: TensorRef, round_act: bool = False):
        self.refs = (gate, up, down)
        self.round_act = round_act
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if e not in self._cache:
            self._cache[e] = tuple(to_torch(get_format(r.ggml_type).dequantize(r.data[e])) for r in self.refs)
        return self._cache[e]

    def _round(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return round_activations(x, self.refs[i].ggml_type) if self.round_act else x

    def __call__(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)  # [T, D]
        xg, xu = self._round(h, 0), self._round(h, 1)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            gate, up, down = self.weights(e)  # [F, D], [F, D], [D, F]
            mid = F.silu(xg[tok] @ gate.T) * (xu[tok] @ up.T)  # [t, F]
            y = self._round(mid, 2) @ down.T  # [t, D]
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out


class CpuQuantExperts(SyncExperts):
    """The raw GGUF blocks through the Numba kernels (experts/moe_cpu.py): activations quantized to
    Q8_K/Q8_0 once per layer as llama.cpp does; large groups of a prefill go through torch bf16, or
    the panel GEMM (int8_prefill; with `panels`, the stored panels of gate, up and down, every group).
    With a NUMA executor each node's pinned threads compute their share of the FFN dimension."""

    def __init__(self, gate: TensorRef, up: TensorRef, down: TensorRef, layer: int = 0, numa=None,
                 where: str = "in place (mmap)", int8_prefill: bool = False, panels=None):
        from hybrid_runtime.experts import moe_cpu

        from hybrid_runtime.experts import prefill

        self.layer, self.numa, self.where = layer, numa, where
        self.int8_prefill = int8_prefill  # large groups through the panel GEMM instead of bf16
        self._moe, self._prefill, self._min_tokens = moe_cpu.moe_forward, prefill.prefill_forward, prefill.TORCH_MIN_TOKENS
        self.weights = moe_cpu.ExpertWeights(gate.data, up.data, down.data, gate.ggml_type, up.ggml_type,
                                             down.ggml_type, n_expert=gate.shape[0], n_ff=gate.shape[1],
                                             hidden=gate.shape[2], panels=panels)
        if numa is not None:
            numa.load({layer: self.weights})

    def describe(self) -> str:
        w = self.weights
        where = f"NUMA {self.numa.placement}" if self.numa is not None else self.where
        return f"Numba kernels {w.gate_type.name}/{w.up_type.name}/{w.down_type.name}, {where}"

    def __call__(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(h.detach().float().cpu().numpy())  # [T, D]
        i = ids.cpu().numpy()
        w = weights.detach().float().cpu().numpy()
        if self.numa is not None:
            out = self.numa.forward(self.layer, x, i, w)
        elif x.shape[0] >= self._min_tokens:
            out = self._prefill(x, i, w, self.weights, int8=self.int8_prefill)
        else:
            out = self._moe(x, i, w, self.weights)
        return torch.from_numpy(out).to(h.device)


def kernel_types_supported(refs) -> bool:
    from hybrid_runtime.quant.kernels import CPU_KERNELS

    return all(r.ggml_type in CPU_KERNELS for r in refs)
