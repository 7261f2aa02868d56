"""The hybrid weight provider: GPU-placed matrices kept as raw GGUF blocks on the device.

Driven by a PlacementPlan. GPU matrices become `QuantLinear` (uint8 blocks on the device,
dequantized per call to the compute dtype: bf16 on CUDA, float32 on a CPU stand-in), vectors,
router and the absorbed MLA matrices are float32 on the device, the embedding table is read
from RAM (rows moved to the device) when the plan keeps it there, and `experts(layer)` is a
HybridExperts backend. Hidden states are float32 on the device; only matmul inputs are cast.
"""

from __future__ import annotations

import numpy as np
import torch

from hybrid_runtime.config import ModelConfig, RuntimeOptions
from hybrid_runtime.experts.backends import expert_refs
from hybrid_runtime.experts.gpu_cache import GpuExpertCache, RoutingRecorder, RoutingStats
from hybrid_runtime.experts.hybrid import HybridExperts, PrefillPolicy, float_cpu_share, quant_cpu_share
from hybrid_runtime.plan import PlacementPlan
from hybrid_runtime.quant.act_quant import round_activations
from hybrid_runtime.quant.torch_dequant import dequantize
from hybrid_runtime.weights.gguf_file import GGUFModelFile, TensorRef
from hybrid_runtime.weights.provider import HeadLinear, RoundedHeadLinear

# QuantLinear dequantizes at most this many weight elements at once (the head of K2 is 1.2 G):
# scratch = DEQUANT_CHUNK_ELEMS * (4 + 2) bytes, well inside plan.RUNTIME_RESERVE.
DEQUANT_CHUNK_ELEMS = 32 << 20


def upload(ref: TensorRef, device: torch.device) -> torch.Tensor:
    """The tensor's raw file data (blocks as uint8, floats as they are) as a torch tensor on device."""
    return torch.from_numpy(np.array(ref.data, copy=True)).to(device)


class QuantLinear:
    """y = x @ W.T with W kept as raw GGUF blocks [out, row_bytes] on the device."""

    __slots__ = ("raw", "ggml_type", "dtype", "rows_per_chunk", "round_act")

    def __init__(self, raw: torch.Tensor, ggml_type: int, n_in: int, dtype: torch.dtype, round_act: bool = False):
        self.raw, self.ggml_type, self.dtype = raw, ggml_type, dtype
        self.rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMS // max(n_in, 1))
        self.round_act = round_act  # llama.cpp's activation rounding (the default compute mode)

    def weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return dequantize(self.raw[start:stop], self.ggml_type, self.dtype)  # [rows, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = (round_activations(x, self.ggml_type) if self.round_act else x).to(self.dtype)  # [T, in]
        n_out = self.raw.shape[0]
        if n_out <= self.rows_per_chunk:
            return (xs @ self.weight().T).to(x.dtype)
        parts = [xs @ self.weight(i, i + self.rows_per_chunk).T for i in range(0, n_out, self.rows_per_chunk)]
        return torch.cat(parts, dim=-1).to(x.dtype)  # [T, out]


class HostLinear:
    """A matrix the plan keeps in RAM: float32 on the CPU, inputs moved there and back."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to("cpu", torch.float32) @ self.weight.T).to(x.device, x.dtype)


class RawEmbedding:
    """Rows of a raw (possibly quantized) table, dequantized on lookup; the table on `where`."""

    __slots__ = ("raw", "ggml_type", "device")

    def __init__(self, raw: torch.Tensor, ggml_type: int, device: torch.device):
        self.raw, self.ggml_type, self.device = raw, ggml_type, device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.raw[ids.to(self.raw.device)]  # [T, row_bytes]
        return dequantize(rows.to(self.device), self.ggml_type, torch.float32)  # [T, D]


class DeviceWeights:
    """Weight provider of the hybrid path (same methods as FloatWeights)."""

    def __init__(self, gf: GGUFModelFile, cfg: ModelConfig, plan: PlacementPlan, device: torch.device,
                 compute_dtype: torch.dtype, experts_factory):
        self.gf, self.cfg, self.plan = gf, cfg, plan
        self.device, self.compute_dtype = device, compute_dtype
        self._experts_factory = experts_factory
        self._dense: dict[str, torch.Tensor] = {}
        self.round_act = False  # set for compute="fast": activations rounded as llama.cpp does

    def has(self, name: str) -> bool:
        return self.gf.has(name)

    def on_gpu(self, name: str) -> bool:
        return self.plan.device_of(name) == "gpu"

    def matrix(self, name: str) -> torch.Tensor:
        """Dense float32 on the device (router, absorbed MLA matrices, vectors)."""
        if name not in self._dense:
            ref = self.gf.tensor(name)
            raw = upload(ref, self.device)
            self._dense[name] = dequantize(raw, ref.ggml_type, torch.float32).reshape(ref.shape)
        return self._dense[name]

    def vector(self, name: str) -> torch.Tensor:
        return self.matrix(name).reshape(-1)

    def linear(self, name: str):
        ref = self.gf.tensor(name)
        if self.on_gpu(name) or self.device.type == "cpu":
            return QuantLinear(upload(ref, self.device), ref.ggml_type, ref.shape[-1], self.compute_dtype,
                               self.round_act)
        host = dequantize(torch.from_numpy(np.array(ref.data, copy=True)), ref.ggml_type, torch.float32)
        return HostLinear(host)

    def head_linear(self, name: str) -> HeadLinear:
        if self.round_act:
            return RoundedHeadLinear(self.matrix(name), self.gf.tensor(name).ggml_type)
        return HeadLinear(self.matrix(name))

    def head_linear_from(self, weight: torch.Tensor) -> HeadLinear:
        return HeadLinear(weight.to(self.device))

    def embedding(self, name: str) -> RawEmbedding:
        ref = self.gf.tensor(name)
        where = self.device if self.on_gpu(name) else torch.device("cpu")
        return RawEmbedding(upload(ref, where), ref.ggml_type, self.device)

    def experts(self, layer: int) -> HybridExperts:
        return self._experts_factory(layer)


def build_hybrid_weights(gf: GGUFModelFile, cfg: ModelConfig, opts: RuntimeOptions, plan: PlacementPlan) -> DeviceWeights:
    """The hybrid provider: plan-placed weights, a hot-expert cache and per-layer HybridExperts."""
    device = torch.device(opts.gpu_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not plan.uses_gpu:
        device = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    moe_layers = [l for l in range(cfg.n_layer) if cfg.is_moe_layer(l)]
    from hybrid_runtime.loader import prepared_expert_refs

    cpu_layers = [l for l in moe_layers if plan.expert_layers.get(l) != "gpu"]
    refs = {l: expert_refs(gf, l) for l in moe_layers}
    refs.update(prepared_expert_refs(gf, cfg, opts, cpu_layers))  # the CPU share, faulted in or copied
    cache = _make_cache(plan, refs, cfg, device, opts)
    recorder = RoutingRecorder(getattr(opts, "record_routing")) if getattr(opts, "record_routing", None) else None
    speculate_on = bool(getattr(opts, "speculative_prefetch", False))
    weights: DeviceWeights | None = None

    def experts(layer: int) -> HybridExperts:
        on_gpu = plan.expert_layers.get(layer) == "gpu"
        layer_raw = tuple(upload(r, device) for r in refs[layer]) if on_gpu else None
        share = (quant_cpu_share(refs[layer]) if opts.compute == "fast" else None) or float_cpu_share(refs[layer])
        spec = _speculator(weights, cfg, layer + 1) if speculate_on and layer + 1 in refs else None
        return HybridExperts(layer, refs[layer], share, device, dtype, cache=None if on_gpu else cache,
                             layer_on_gpu=layer_raw, recorder=recorder, prefill=PrefillPolicy(), speculate=spec,
                             round_act=opts.compute == "fast")

    weights = DeviceWeights(gf, cfg, plan, device, dtype, experts)
    weights.round_act = opts.compute == "fast"
    weights.cache, weights.recorder = cache, recorder
    return weights


def _make_cache(plan: PlacementPlan, refs: dict, cfg: ModelConfig, device: torch.device, opts) -> GpuExpertCache | None:
    cpu_layers = {l: r for l, r in refs.items() if plan.expert_layers.get(l) == "cpu"}
    if plan.cache_slots <= 0 or not cpu_layers:
        return None
    stats = RoutingStats(cfg.n_layer, cfg.n_expert)
    cache = GpuExpertCache(plan.cache_slots, device, cpu_layers, cfg.n_layer, cfg.n_expert, stats)
    profile = getattr(opts, "expert_profile", None)
    if profile:
        stats.load_profile(profile)
        cache.warm_start()
    return cache


def _speculator(weights: DeviceWeights, cfg: ModelConfig, next_layer: int):
    """Layer L+1's router applied to layer L's FFN input: a guess of L+1's experts, ids [T, K]."""
    name = f"blk.{next_layer}.ffn_gate_inp.weight"

    def guess(h: torch.Tensor) -> np.ndarray:
        logits = h.float() @ weights.matrix(name).T  # [T, E]
        return logits.topk(cfg.n_expert_used, dim=-1).indices.cpu().numpy()

    return guess
