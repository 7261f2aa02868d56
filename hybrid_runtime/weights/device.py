"""The hybrid weight provider: GPU-placed matrices kept as raw GGUF blocks on the device.

Driven by a PlacementPlan. GPU matrices become `QuantLinear` (uint8 blocks on the device,
dequantized per call to the compute dtype: bf16 on CUDA, float32 on a CPU stand-in), vectors,
router and the absorbed MLA matrices are float32 on the device, the embedding table is read
from RAM (rows moved to the device) when the plan keeps it there, and `experts(layer)` is a
HybridExperts backend. Hidden states are float32 on the device; only matmul inputs are cast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime.config import ModelConfig, RuntimeOptions
from hybrid_runtime.experts.backends import expert_refs
from hybrid_runtime.experts.gpu_cache import GpuExpertCache, RoutingRecorder, RoutingStats
from hybrid_runtime.experts.hybrid import HybridExperts, PrefillPolicy, float_cpu_share, quant_cpu_share
from hybrid_runtime.experts.stream import ExpertStream
from hybrid_runtime.plan import PlacementPlan
from hybrid_runtime.quant.act_quant import round_activations
from hybrid_runtime.quant.torch_dequant import dequantize
from hybrid_runtime.weights.gguf_file import GGUFModelFile, TensorRef
from hybrid_runtime.weights.provider import HeadLinear, RoundedHeadLinear

# QuantLinear dequantizes at most this many weight elements at once (the head of K2 is 1.2 G):
# scratch = DEQUANT_CHUNK_ELEMS * (4 + 2) bytes, well inside plan.RUNTIME_RESERVE.
DEQUANT_CHUNK_ELEMS = 32 << 20
log = logging.getLogger(__name__)


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


class GraphedLinear:
    """A QuantLinear whose one-token calls replay a CUDA graph: its ~20 dequantize kernels and the
    matmul become one launch. Captured on the third one-token call (the first two warm up cuBLAS
    and the allocator); any other shape, or a capture that fails, runs the plain QuantLinear.
    All graphs of a model share one memory pool: they never run at the same time.
    """

    WARMUP_CALLS = 2
    __slots__ = ("lin", "pool", "calls", "graph", "static_in", "static_out", "failed")

    def __init__(self, lin: QuantLinear, pool):
        self.lin, self.pool = lin, pool
        self.calls, self.graph, self.static_in, self.static_out, self.failed = 0, None, None, None, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed or x.shape[0] != 1 or x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self.lin(x)
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.WARMUP_CALLS or not self._capture(x):
                return self.lin(x)
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            return self.lin(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor) -> bool:
        try:
            self.static_in = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                self.lin(self.static_in)  # warm-up on a side stream, as capture requires
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.static_out = self.lin(self.static_in)
            self.graph = graph
            return True
        except RuntimeError as e:  # an op that cannot be captured: stay eager, say so once
            log.warning("CUDA graph capture failed (%s); this matrix runs without a graph", e)
            self.failed, self.graph, self.static_in, self.static_out = True, None, None, None
            return False


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
        self.cuda_graphs = False  # one-token GPU matmuls as CUDA graphs (GraphedLinear)
        self._graph_pool = None

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
            lin = QuantLinear(upload(ref, self.device), ref.ggml_type, ref.shape[-1], self.compute_dtype,
                              self.round_act)
            if self.cuda_graphs and self.device.type == "cuda":
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                return GraphedLinear(lin, self._graph_pool)
            return lin
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

    def describe(self) -> str:
        """One line: what the GPU holds (the plan's placement)."""
        p = self.plan
        on_gpu = sum(1 for d in p.expert_layers.values() if d == "gpu")
        parts = [f"{self.device} ({str(self.compute_dtype).removeprefix('torch.')}): attention, norms, router, "
                 f"shared experts, head as quantized blocks",
                 f"embedding in {'VRAM' if p.device_of('token_embd.weight') == 'gpu' else 'RAM'}",
                 f"routed experts of {on_gpu} of {len(p.expert_layers)} MoE layers on the GPU"]
        if getattr(self, "cache", None) is not None:
            parts.append(f"{self.cache.n_slots} hot-expert slots")
        if getattr(self, "stream", None) is not None:
            parts.append(f"prefill ring of {self.stream.n_ring}")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        return "; ".join(parts)


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
    cpu_refs = {l: refs[l] for l in cpu_layers}  # what the cache and the prefill ring serve
    cache = _make_cache(plan, cpu_refs, cfg, device, opts)
    stream = ExpertStream(plan.prefill_slots, device, cpu_refs, cache) if plan.prefill_slots >= 2 and cpu_refs else None
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
                             round_act=opts.compute == "fast", stream=stream)

    weights = DeviceWeights(gf, cfg, plan, device, dtype, experts)
    weights.round_act = opts.compute == "fast"
    weights.cuda_graphs = bool(getattr(opts, "cuda_graphs", False)) and device.type == "cuda"
    weights.cache, weights.recorder, weights.stream = cache, recorder, stream
    return weights


def _make_cache(plan: PlacementPlan, cpu_layers: dict, cfg: ModelConfig, device: torch.device,
                opts) -> GpuExpertCache | None:
    if plan.cache_slots <= 0 or not cpu_layers:
        return None
    stats = RoutingStats(cfg.n_layer, cfg.n_expert)
    cache = GpuExpertCache(plan.cache_slots, device, cpu_layers, cfg.n_layer, cfg.n_expert, stats)
    profile = getattr(opts, "expert_profile", None)
    if profile and Path(profile).is_file():  # a new profile is written when the model is closed
        stats.load_profile(profile)
        cache.warm_start()
    return cache


def _speculator(weights: DeviceWeights, cfg: ModelConfig, next_layer: int):
    """Layer L+1's router applied to layer L's FFN input: a guess of L+1's experts, ids [T, K] on the
    device (HybridExperts downloads it with the layer's routing: no extra sync)."""
    name = f"blk.{next_layer}.ffn_gate_inp.weight"

    def guess(h: torch.Tensor) -> torch.Tensor:
        logits = h.float() @ weights.matrix(name).T  # [T, E]
        return logits.topk(cfg.n_expert_used, dim=-1).indices

    return guess
