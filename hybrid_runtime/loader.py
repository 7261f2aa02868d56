"""Turn an opened GGUF into weight providers according to the runtime options."""

from __future__ import annotations

import os

import torch

from hybrid_runtime.config import ModelConfig, RuntimeOptions
from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.experts.backends import (CpuQuantExperts, FloatExperts, expert_refs, expert_tensor_names,
                                             kernel_types_supported)
from hybrid_runtime.quant.registry import get_format
from hybrid_runtime.weights.gguf_file import GGUFModelFile
from hybrid_runtime.weights.provider import FloatWeights, RoundedWeights


def check_tensor_types(gf: GGUFModelFile) -> None:
    for ref in gf.tensors.values():
        get_format(ref.ggml_type)


def configure_threads(threads: int | None) -> int:
    """One policy for torch's and Numba's pools: the same thread count; they run one after the other."""
    from hybrid_runtime.experts.prefill import configure_threads as configure_both

    n = threads or len(os.sched_getaffinity(0))
    choose_threading_layer()
    configure_both(n)
    return n


def choose_threading_layer() -> None:
    """OpenMP for Numba's pool unless NUMBA_THREADING_LAYER says otherwise: one explicit choice,
    reported by the bench JSON (it must be made before the first parallel call)."""
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        try:
            numba.threading_layer()  # raises until a parallel function has run
        except ValueError:
            numba.config.THREADING_LAYER = "omp"


def wants_device(opts: RuntimeOptions) -> bool:
    """The hybrid (GPU) path: asked for, or "auto" with a CUDA device present."""
    return opts.device in ("cuda", "hybrid") or (opts.device == "auto" and torch.cuda.is_available())


def build_weights(gf: GGUFModelFile, cfg: ModelConfig, opts: RuntimeOptions, stored: dict | None = None):
    if wants_device(opts):
        from hybrid_runtime.plan import plan_from_options
        from hybrid_runtime.weights.device import build_hybrid_weights

        if opts.device == "cuda" and not torch.cuda.is_available() and not opts.gpu_device:
            raise InvalidRequestError("--device cuda was asked for, but torch sees no CUDA device")
        return build_hybrid_weights(gf, cfg, opts, plan_from_options(gf, cfg, opts))
    if opts.compute == "reference":
        return FloatWeights(gf, lambda layer: FloatExperts(*expert_refs(gf, layer)))
    if not opts.cpu_kernels:
        return RoundedWeights(gf, lambda layer: FloatExperts(*expert_refs(gf, layer), round_act=True),
                              kernels=False)
    from hybrid_runtime.experts import store

    numa = numa_executor(opts)
    stored = stored if stored is not None else prepared_expert_refs(gf, cfg, opts, all_weights=True)

    def experts(layer: int):
        refs = stored[layer]
        if kernel_types_supported(refs):
            sp = tuple(gf.panels.get(r.name) for r in refs)
            return CpuQuantExperts(*refs, layer=layer, numa=numa, where=store.where(gf.store_report),
                                   int8_prefill=opts.prefill_precision == "int8",
                                   panels=sp if all(p is not None for p in sp) else None)
        return FloatExperts(*refs, round_act=True)  # types without a kernel (Q4_0, Q5_0, F16, ...)

    weights = RoundedWeights(gf, experts, bf16_prefill=opts.prefill_precision == "bf16",
                             int8_prefill=opts.prefill_precision == "int8")
    weights.numa = numa  # for the memory report after load
    return weights


def numa_executor(opts: RuntimeOptions):
    """The pinned per-node expert executor when a numa-tune config is given, else None."""
    if not opts.numa_config:
        return None
    from hybrid_runtime.numa.placement import NumaExpertExecutor
    from hybrid_runtime.numa.topology import discover
    from hybrid_runtime.numa.tune import load_numa_config

    cfg = load_numa_config(opts.numa_config)
    return NumaExpertExecutor(discover(), cfg.placement, cfg.threads_per_node)


# tensors the compiled step reads with its own kernels or gathers rows from: never stored as panels
_RAW_ONLY = ("attn_k_b.weight", "attn_v_b.weight", "token_embd.weight")


def prepared_expert_refs(gf: GGUFModelFile, cfg: ModelConfig, opts: RuntimeOptions, layers=None,
                         all_weights: bool = False, panels: bool = False) -> dict:
    """Every MoE layer's expert tensors after the weight store has faulted them in or copied them;
    all_weights: every other tensor the CPU reads too (the CPU-only path; see experts/store.py);
    panels: the compiled step runs, so its matrices may be stored as panels (gf.panels)."""
    from hybrid_runtime.experts import store

    layers = [l for l in range(cfg.n_layer) if cfg.is_moe_layer(l)] if layers is None else layers
    names = [n for l in layers for n in expert_tensor_names(gf, l)]
    if all_weights:  # an untied embedding is only gathered from: it stays in place
        names += [n for n in gf.tensors if n != "token_embd.weight" or not gf.has("output.weight")]
    mode = opts.expert_store
    if mode == "auto" and opts.numa_config:  # the NUMA executor copies the experts to their nodes itself
        mode = "mmap"
    as_panels = [n for n in names if not n.endswith(_RAW_ONLY)] if panels else []
    gf.store_report = store.prepare(gf, names, mode, opts.progress, panels=as_panels)
    return {l: expert_refs(gf, l) for l in layers}


def compiled_step_applies(opts: RuntimeOptions) -> bool:
    """The compiled CPU step runs the default CPU path (no GPU, no NUMA executor, integer kernels)."""
    return (opts.compiled and opts.compute == "fast" and opts.cpu_kernels and not wants_device(opts)
            and not opts.numa_config)


def build_network(gf: GGUFModelFile, cfg: ModelConfig, opts: RuntimeOptions, rope, torch_model):
    """(network, weight provider): the compiled CPU step where it applies, else the torch model
    `torch_model(weights)`. The compiled step does not apply without AVX-512 VNNI, with the legacy
    attn_kv_b layout or a tensor type without a kernel; then the torch model runs on the expert
    refs already prepared (the expert store is not walked twice)."""
    if not compiled_step_applies(opts):
        weights = build_weights(gf, cfg, opts)
        return torch_model(weights), weights
    from hybrid_runtime.cpu.step import CompiledDeepSeek2
    from hybrid_runtime.errors import UnsupportedModelError
    from hybrid_runtime.experts.prefill import TORCH_MIN_TOKENS

    from hybrid_runtime.quant.cpu_features import has_avx512_vnni

    stored = prepared_expert_refs(gf, cfg, opts, all_weights=True, panels=has_avx512_vnni() and cfg.mla_split)
    weights = build_weights(gf, cfg, opts, stored)
    try:
        step = CompiledDeepSeek2(cfg, gf, stored, rope, opts.prefill_chunk)
    except UnsupportedModelError:
        return torch_model(weights), weights
    if opts.prefill_chunk >= TORCH_MIN_TOKENS:  # large chunks: the torch model on the same cache
        step.prefill_net = torch_model(weights)
        step.prefill_min_tokens = TORCH_MIN_TOKENS
    return step, step
