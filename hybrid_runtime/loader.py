"""Turn an opened GGUF into weight providers according to the runtime options."""

from __future__ import annotations

import os

import torch

from hybrid_runtime.config import ModelConfig, RuntimeOptions
from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.experts.backends import FloatExperts, RoundedFloatExperts, expert_refs
from hybrid_runtime.quant.registry import get_format
from hybrid_runtime.weights.gguf_file import GGUFModelFile
from hybrid_runtime.weights.provider import FloatWeights, RoundedWeights


def check_tensor_types(gf: GGUFModelFile) -> None:
    for ref in gf.tensors.values():
        get_format(ref.ggml_type)


def configure_threads(threads: int | None) -> int:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def wants_device(opts: RuntimeOptions) -> bool:
    """The hybrid (GPU) path: asked for, or "auto" with a CUDA device present."""
    return opts.device in ("cuda", "hybrid") or (opts.device == "auto" and torch.cuda.is_available())


def build_weights(gf: GGUFModelFile, cfg: ModelConfig, opts: RuntimeOptions):
    if wants_device(opts):
        from hybrid_runtime.plan import plan_from_options
        from hybrid_runtime.weights.device import build_hybrid_weights

        if opts.device == "cuda" and not torch.cuda.is_available() and not opts.gpu_device:
            raise InvalidRequestError("--device cuda was asked for, but torch sees no CUDA device")
        return build_hybrid_weights(gf, cfg, opts, plan_from_options(gf, cfg, opts))
    if opts.compute == "reference":
        return FloatWeights(gf, lambda layer: FloatExperts(*expert_refs(gf, layer)))
    return RoundedWeights(gf, lambda layer: RoundedFloatExperts(*expert_refs(gf, layer)))
