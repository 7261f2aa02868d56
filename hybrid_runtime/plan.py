"""Placement plan: which tensor lives on the GPU and which in RAM, from the VRAM and RAM budgets.

Rules (one consumer GPU, design.md §1-2): attention, norms, router, shared experts, dense
layers and the output head go to the GPU, kept quantized; routed experts stay in RAM as GGUF
blocks for the CPU kernels; the VRAM left after those, the latent KV cache for n_ctx and a
runtime reserve becomes hot-expert cache slots (whole experts). The embedding table stays in
RAM unless the whole model fits the card (a lookup moves only T rows). `cpu_moe`, `n_cpu_moe`
and `overrides` (llama.cpp `-ot REGEX=DEVICE`) change that. The plan is plain data.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES

from hybrid_runtime.config import ModelConfig
from hybrid_runtime.errors import HybridError, InvalidRequestError

GIB = 1 << 30
# Kept free inside the GPU budget: CUDA/cuBLAS workspaces, activations of a 512-token prefill
# chunk and the per-call dequantization scratch of QuantLinear (chunked to DEQUANT_CHUNK_BYTES).
RUNTIME_RESERVE = 1 * GIB
# Left to other processes and fragmentation when the budget comes from torch.cuda.mem_get_info.
CUDA_FREE_MARGIN = 512 << 20
# Kept free in RAM for the OS, the Python process and page cache of everything else.
RAM_MARGIN = 4 * GIB
KV_BYTES_PER_VALUE = 2  # bf16 latent cache on the GPU
DEFAULT_N_CTX = 8192
# Expert buffers for layerwise prefill offload (experts/stream.py): uploads run this many experts
# ahead of the GPU compute, across layer boundaries. Taken before the hot-expert cache slots;
# fewer than 2 cannot overlap an upload with compute, so then none (offload off).
PREFILL_RING = 8

COMPONENTS = ("embed", "attn", "norm", "router", "shared", "dense_ffn", "experts", "head")
_GPU_CORE = {"attn", "norm", "router", "shared", "dense_ffn", "head"}
# used as dense float32 matrices by the model (einsum / router), not through QuantLinear
_DENSE_F32 = ("attn_k_b.weight", "attn_v_b.weight", "attn_kv_b.weight")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


@dataclass(slots=True)
class TensorPlacement:
    name: str
    component: str
    layer: int | None
    device: str  # "gpu" | "cpu"
    n_bytes: int  # in the file
    gpu_bytes: int  # resident on the GPU when placed there (dense float32 for some)


@dataclass(slots=True)
class PlacementPlan:
    """Where every tensor lives; budgets and what the GPU holds besides weights."""

    tensors: list[TensorPlacement]
    expert_layers: dict[int, str]  # MoE layer -> "cpu" | "gpu" (its routed experts)
    cache_slots: int  # hot-expert cache slots on the GPU
    slot_bytes: int  # bytes of one expert (gate + up + down), the largest over layers
    n_expert: int
    gpu_budget: int
    ram_budget: int
    n_ctx: int
    kv_bytes: int
    reserve_bytes: int = RUNTIME_RESERVE
    prefill_slots: int = 0  # expert buffers of the layerwise prefill offload ring
    _by_name: dict[str, TensorPlacement] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

    def device_of(self, name: str) -> str:
        return self._by_name[name].device if name in self._by_name else "cpu"

    @property
    def uses_gpu(self) -> bool:
        return self.gpu_budget > 0

    @property
    def gpu_weight_bytes(self) -> int:
        return sum(t.gpu_bytes for t in self.tensors if t.device == "gpu")

    @property
    def gpu_total(self) -> int:
        used = self.gpu_weight_bytes + (self.cache_slots + self.prefill_slots) * self.slot_bytes
        return used + (self.kv_bytes + self.reserve_bytes if self.uses_gpu else 0)

    @property
    def cpu_total(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.device == "cpu")

    def bytes_by_component(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {c: {"gpu": 0, "cpu": 0} for c in COMPONENTS}
        for t in self.tensors:
            out[t.component][t.device] += t.gpu_bytes if t.device == "gpu" else t.n_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_budget": self.gpu_budget, "ram_budget": self.ram_budget, "n_ctx": self.n_ctx,
            "gpu_total": self.gpu_total, "cpu_total": self.cpu_total,
            "kv_bytes": self.kv_bytes, "reserve_bytes": self.reserve_bytes if self.uses_gpu else 0,
            "cache_slots": self.cache_slots, "slot_bytes": self.slot_bytes, "prefill_slots": self.prefill_slots,
            "expert_layers": {str(k): v for k, v in sorted(self.expert_layers.items())},
            "components": self.bytes_by_component(),
            "tensors": [asdict(t) for t in self.tensors],
        }


# -- inputs -------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class _Spec:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_bytes: int


def _specs(tensors) -> list[_Spec]:
    items = tensors.values() if isinstance(tensors, dict) else tensors
    out = []
    for t in items:
        if isinstance(t, tuple):
            out.append(_Spec(t[0], int(t[1]), tuple(t[2]), int(t[3])))
        else:
            out.append(_Spec(t.name, int(t.ggml_type), tuple(t.shape), int(t.n_bytes)))
    return out


def component_of(name: str) -> str:
    """The model part a tensor belongs to, from its GGUF name."""
    if name.startswith("token_embd"):
        return "embed"
    if name.startswith("output."):
        return "head"
    if name.endswith("norm.weight"):
        return "norm"
    if "_exps." in name:
        return "experts"
    if "ffn_gate_inp" in name or "exp_probs_b" in name:
        return "router"
    if "_shexp." in name:
        return "shared"
    if ".ffn_" in name:
        return "dense_ffn"
    return "attn"


def _gpu_bytes(s: _Spec, component: str) -> int:
    if component in ("norm", "router") or s.name.endswith(_DENSE_F32):
        return int(np.prod(s.shape)) * 4
    return s.n_bytes


def _layer(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


# -- options ------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'24GiB', '24G' (binary), '24GB' (decimal), '512MiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidRequestError(f"cannot read {text!r} as a size (examples: 24GiB, 512MiB, 8G)")
    value, unit, binary, b = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (b and not binary and unit) else 1024
    return int(float(value) * base**power)


def parse_overrides(rules: Iterable[str]) -> list[tuple[re.Pattern, str]]:
    """['exps=CPU', r'blk\\.(1|2)\\..*=GPU'] -> [(regex, 'cpu'|'gpu')]; the first match wins."""
    out = []
    for rule in rules:
        pattern, sep, dev = str(rule).rpartition("=")
        device = _device_name(dev)
        if not sep or not pattern or device is None:
            raise InvalidRequestError(f"override {rule!r} must look like REGEX=CPU or REGEX=GPU")
        try:
            out.append((re.compile(pattern), device))
        except re.error as e:
            raise InvalidRequestError(f"override {rule!r} has an invalid regular expression ({e})") from None
    return out


def _device_name(dev: str) -> str | None:
    d = dev.strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "gpu" or re.fullmatch(r"cuda\d*", d):
        return "gpu"
    return None


def _forced(name: str, rules) -> str | None:
    for rx, dev in rules:
        if rx.search(name):
            return dev
    return None


def default_gpu_budget() -> int:
    """Free memory of the first CUDA device minus a margin; 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info()
    return max(0, free - CUDA_FREE_MARGIN)


def default_ram_budget() -> int:
    import psutil

    return max(0, psutil.virtual_memory().total - RAM_MARGIN)


def default_kv_bytes_per_token(cfg: ModelConfig) -> int:
    return cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope) * KV_BYTES_PER_VALUE


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


# -- planning -----------------------------------------------------------------------------------
def make_plan(tensors, cfg: ModelConfig, gpu_mem: int | None = None, ram: int | None = None,
              cpu_moe: bool = False, n_cpu_moe: int | None = None, overrides: Iterable[str] = (),
              kv_bytes_per_token: int | None = None, n_ctx: int | None = None) -> PlacementPlan:
    """Place every tensor; raises HybridError when the GPU part or the RAM part does not fit.

    `tensors`: GGUFModelFile.tensors, or a list of (name, ggml_type, shape, n_bytes).
    `gpu_mem` None: the free CUDA memory (0 without CUDA: everything on the CPU).
    """
    rules = parse_overrides(overrides)
    gpu_mem = default_gpu_budget() if gpu_mem is None else parse_size(gpu_mem)
    ram = default_ram_budget() if ram is None else parse_size(ram)
    n_ctx = n_ctx or min(cfg.n_ctx_train, DEFAULT_N_CTX)
    kv = (kv_bytes_per_token if kv_bytes_per_token is not None else default_kv_bytes_per_token(cfg)) * n_ctx
    specs = _specs(tensors)
    tied = not any(s.name == "output.weight" for s in specs)  # the head reads token_embd
    placed = [_initial(s, rules, gpu_mem > 0, tied) for s in specs]
    if gpu_mem <= 0:
        forced = [t.name for t in placed if t.device == "gpu"]
        if forced:
            raise InvalidRequestError(f"override puts {forced[0]} on the GPU, but there is no GPU memory to use")
        kv = 0
    layers = _expert_layers(placed, rules, cpu_moe, n_cpu_moe, gpu_mem > 0)
    fixed = sum(t.gpu_bytes for t in placed if t.device == "gpu" and t.component != "experts")
    fixed += sum(_layer_bytes(placed, l, gpu=True) for l, d in layers.items() if d == "gpu")
    need = fixed + (kv + RUNTIME_RESERVE if gpu_mem > 0 else 0)
    if need > gpu_mem > 0:
        raise HybridError(f"the GPU part of the model needs {fmt_bytes(need)} (weights {fmt_bytes(fixed)}, "
                          f"KV cache for {n_ctx} tokens {fmt_bytes(kv)}, reserve {fmt_bytes(RUNTIME_RESERVE)}) "
                          f"but the GPU budget is {fmt_bytes(gpu_mem)}; lower n_ctx or move tensors with --override")
    left = gpu_mem - need if gpu_mem > 0 else 0
    left = _fill_expert_layers(placed, layers, left)
    left = _place_embedding(placed, rules, left)
    for t in placed:
        if t.component == "experts":
            t.device = layers[t.layer]
    slot_bytes, n_expert = _slot_bytes(placed, cfg)
    cpu_experts = sum(1 for d in layers.values() if d == "cpu") * n_expert
    ring = min(PREFILL_RING, left // slot_bytes) if slot_bytes and cpu_experts else 0
    ring = ring if ring >= 2 else 0
    left -= ring * slot_bytes
    slots = 0 if cpu_moe or slot_bytes == 0 else min(left // slot_bytes, cpu_experts)
    plan = PlacementPlan(placed, layers, int(slots), slot_bytes, n_expert, gpu_mem, ram, n_ctx, kv,
                         prefill_slots=int(ring))
    _check_ram(plan)
    return plan


def _initial(s: _Spec, rules, have_gpu: bool, tied: bool) -> TensorPlacement:
    comp = component_of(s.name)
    comp = "head" if tied and comp == "embed" else comp
    device = "gpu" if have_gpu and comp in _GPU_CORE else "cpu"
    if comp != "experts":
        device = _forced(s.name, rules) or device
    return TensorPlacement(s.name, comp, _layer(s.name), device, s.n_bytes, _gpu_bytes(s, comp))


def _expert_layers(placed, rules, cpu_moe: bool, n_cpu_moe: int | None, have_gpu: bool) -> dict[int, str]:
    """MoE layer -> 'cpu' | 'gpu' (forced by override) | 'want' (GPU if it fits)."""
    by_layer: dict[int, set[str]] = defaultdict(set)
    for t in placed:
        if t.component == "experts":
            by_layer[t.layer].add(_forced(t.name, rules) or "")
    out = {}
    for i, layer in enumerate(sorted(by_layer)):
        forced = by_layer[layer] - {""}
        if len(forced) > 1 or (forced and "" in by_layer[layer]):
            raise InvalidRequestError(f"overrides split the routed experts of layer {layer} between devices; "
                                      "gate, up and down must go together")
        if forced:
            out[layer] = forced.pop()
        elif cpu_moe or not have_gpu or n_cpu_moe is None or i < n_cpu_moe:
            out[layer] = "cpu"
        else:
            out[layer] = "want"
    return out


def _layer_bytes(placed, layer: int, gpu: bool) -> int:
    return sum(t.gpu_bytes if gpu else t.n_bytes for t in placed if t.component == "experts" and t.layer == layer)


def _fill_expert_layers(placed, layers: dict[int, str], left: int) -> int:
    for layer in sorted(layers):
        if layers[layer] == "want":
            size = _layer_bytes(placed, layer, gpu=True)
            layers[layer] = "gpu" if size <= left else "cpu"
            left -= size if layers[layer] == "gpu" else 0
    return left


def _place_embedding(placed, rules, left: int) -> int:
    """On the GPU only when it and every CPU-side routed expert would fit there too."""
    cpu_experts = sum(t.n_bytes for t in placed if t.component == "experts" and t.device == "cpu")
    for t in placed:
        if t.component == "embed" and _forced(t.name, rules) is None and left > 0:
            if t.gpu_bytes + cpu_experts <= left:
                t.device, left = "gpu", left - t.gpu_bytes
    return left


def _slot_bytes(placed, cfg: ModelConfig) -> tuple[int, int]:
    per_layer: dict[int, int] = defaultdict(int)
    for t in placed:
        if t.component == "experts":
            per_layer[t.layer] += t.n_bytes
    n_expert = max(cfg.n_expert, 1)
    return (max(per_layer.values()) // n_expert if per_layer else 0), cfg.n_expert


def _check_ram(plan: PlacementPlan) -> None:
    need = plan.cpu_total
    if need > plan.ram_budget:
        raise HybridError(f"the CPU part of the model needs {fmt_bytes(need)} of RAM but only "
                          f"{fmt_bytes(plan.ram_budget)} is available; use a smaller quant or move layers to the GPU")


def plan_from_options(gf, cfg: ModelConfig, opts, n_ctx: int | None = None) -> PlacementPlan:
    """The plan for an opened file and RuntimeOptions (gpu_mem, cpu_moe, n_cpu_moe, override)."""
    gpu_mem = opts.gpu_mem
    if gpu_mem is None and opts.gpu_device is not None and not str(opts.gpu_device).startswith("cuda"):
        gpu_mem = 0  # a CPU stand-in without a budget: nothing to measure
    return make_plan(gf.tensors, cfg, gpu_mem=gpu_mem, cpu_moe=opts.cpu_moe, n_cpu_moe=opts.n_cpu_moe,
                     overrides=opts.override, n_ctx=n_ctx or opts.n_ctx)


# -- display ------------------------------------------------------------------------------------
def describe_plan(plan: PlacementPlan, console) -> None:
    """Print the plan as a rich table (per component GPU / RAM bytes) and a summary."""
    from rich.table import Table

    table = Table(title="Placement plan")
    for col in ("component", "GPU", "RAM", "tensors"):
        table.add_column(col, justify="left" if col == "component" else "right")
    counts: dict[str, int] = defaultdict(int)
    for t in plan.tensors:
        counts[t.component] += 1
    for comp, b in plan.bytes_by_component().items():
        if counts[comp]:
            table.add_row(comp, fmt_bytes(b["gpu"]) if b["gpu"] else "-", fmt_bytes(b["cpu"]) if b["cpu"] else "-",
                          str(counts[comp]))
    console.print(table)
    on_gpu = sorted(l for l, d in plan.expert_layers.items() if d == "gpu")
    console.print(f"routed experts: {len(plan.expert_layers) - len(on_gpu)} layers in RAM, {len(on_gpu)} on the GPU"
                  + (f" ({_ranges(on_gpu)})" if on_gpu else ""))
    if plan.uses_gpu:
        console.print(f"hot-expert cache: {plan.cache_slots} slots of {fmt_bytes(plan.slot_bytes)} "
                      f"= {fmt_bytes(plan.cache_slots * plan.slot_bytes)}")
        if plan.prefill_slots:
            console.print(f"prefill offload ring: {plan.prefill_slots} experts "
                          f"= {fmt_bytes(plan.prefill_slots * plan.slot_bytes)}")
        elif len(on_gpu) < len(plan.expert_layers):
            console.print("prefill offload: off (no room for its expert buffers)")
        console.print(f"KV cache ({plan.n_ctx} tokens): {fmt_bytes(plan.kv_bytes)}, reserve {fmt_bytes(plan.reserve_bytes)}")
    console.print(f"GPU: {fmt_bytes(plan.gpu_total)} of {fmt_bytes(plan.gpu_budget)}; "
                  f"RAM: {fmt_bytes(plan.cpu_total)}" + (f" of {fmt_bytes(plan.ram_budget)}" if plan.ram_budget < 1 << 60 else ""))


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if start != x else str(x))
            start = None
    return ", ".join(out)
