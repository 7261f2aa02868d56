"""Scale models: deepseek2 GGUFs at real Kimi K2 shapes, written as random quant blocks.

Routed experts: Q4_K (gate, up) and Q6_K (down); other matrices Q8_0; norms, router and
bias F32. Tensors are streamed one chunk at a time, so memory stays low whatever the size.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.synth.blocks import random_tensor_chunks
from hybrid_runtime.synth.layout import TensorSpec, tensor_specs
from hybrid_runtime.synth.presets import Preset, get_preset
from hybrid_runtime.synth.tiny import random_tensor
from hybrid_runtime.synth.writer import PlannedTensor, add_model_metadata, write_header_only, write_streaming

Q = gguf.GGMLQuantizationType
_QTYPE_BY_ROLE = {"expert_gate": Q.Q4_K, "expert_up": Q.Q4_K, "expert_down": Q.Q6_K,
                  "norm": Q.F32, "router": Q.F32, "bias": Q.F32}
_FILE_TYPE_Q4_K_M = 15


def make_scale_model(preset: str | Preset, out: str | os.PathLike, layers: int | None = None,
                     metadata_only: bool = False, seed: int = 0, vocab: int | None = None, **overrides) -> Path:
    """Write a scale model to `out` and return its path.

    `layers` overrides the preset's layer count; with one layer that layer is an MoE layer
    (no dense lead). `metadata_only` writes a complete header whose data region is a sparse
    hole (no disk used). `overrides` change preset fields (e.g. hidden=256 for a fast test).
    `vocab`: tokens in the embedding and head; default the synthetic 2,048, or for a metadata-only
    file the real model's (Kimi K2: 163,840), so that planning sees true sizes.
    """
    p = _resolve(preset, layers, overrides)
    if vocab is None and metadata_only and p.real_vocab:
        vocab = p.real_vocab
    if vocab is not None:
        if vocab < p.vocab:
            raise InvalidRequestError(f"--vocab must be at least {p.vocab}, not {vocab}.")
        p = p.replace(vocab=vocab)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(p, "split")
    plan = [PlannedTensor(s.name, s.shape, _QTYPE_BY_ROLE.get(s.role, Q.Q8_0)) for s in specs]
    fill = lambda w: add_model_metadata(w, p, "split", _FILE_TYPE_Q4_K_M)  # noqa: E731
    if metadata_only:
        write_header_only(out, fill, plan)
        return out
    by_name = {s.name: s for s in specs}
    write_streaming(out, fill, plan, lambda t: tensor_chunks(by_name[t.name], t.qtype, seed))
    return out


def _resolve(preset: str | Preset, layers: int | None, overrides: dict) -> Preset:
    p = get_preset(preset) if isinstance(preset, str) else preset
    if overrides:
        p = p.replace(**overrides)
    if layers is not None:
        if layers < 1:
            raise InvalidRequestError(f"--layers must be at least 1, not {layers}.")
        p = p.replace(n_layer=layers, n_dense_lead=min(p.n_dense_lead, layers - 1))
    if p.q_lora == 0 and p.n_layer not in (26, 27):
        raise InvalidRequestError("A model without q-LoRA must have 26 or 27 layers for llama.cpp.")
    return p


def tensor_chunks(spec: TensorSpec, qtype: Q, seed: int) -> Iterator[np.ndarray]:
    """The bytes of one tensor: F32 values as in the tiny models, or random quant blocks."""
    if qtype == Q.F32:
        yield random_tensor(spec, seed)
        return
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    yield from random_tensor_chunks(rng, qtype, spec.shape, _target_std(spec))


def _target_std(spec: TensorSpec) -> float:
    if spec.role == "embed":
        return 0.5
    if spec.role == "output":
        return 2.0 / np.sqrt(spec.fan_in)
    fan_in = spec.shape[1] if spec.role == "k_b" else spec.fan_in
    return 0.5 / np.sqrt(fan_in)
