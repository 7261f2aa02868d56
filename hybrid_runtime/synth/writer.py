"""GGUF writing for the synthetic models: deepseek2 metadata and a streaming tensor writer.

The streaming writer declares every tensor first (header + tensor infos), then writes each
tensor's bytes as it is produced, so only one tensor is ever held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.synth.chat_template import kimi_k2_template
from hybrid_runtime.synth.presets import Preset
from hybrid_runtime.synth.tokenizer import add_tokenizer

ARCH = "deepseek2"


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]              # numpy order, in elements
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        assert self.shape[-1] % block == 0, (self.name, self.shape, self.qtype)
        return n // block * size


def add_model_metadata(w: gguf.GGUFWriter, p: Preset, kv_layout: str, file_type: int,
                       thinking: bool | str = False, tokenizer: Callable[[], None] | None = None,
                       name: str | None = None) -> None:
    """All deepseek2.* / general.* / tokenizer.* keys of a synthetic model (`tokenizer` writes the
    tokenizer.* keys instead of the synthetic vocabulary)."""
    w.add_name(name or f"synthetic {p.name}")
    w.add_file_type(file_type)
    w.add_context_length(p.context_length)
    w.add_embedding_length(p.hidden)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.dense_ff)
    w.add_head_count(p.n_head)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_rope_freq_base(p.rope_base)
    w.add_rope_dimension_count(p.rope_dim)
    w.add_vocab_size(p.vocab)
    w.add_leading_dense_block_count(p.n_dense_lead)
    if p.q_lora:
        w.add_q_lora_rank(p.q_lora)
    w.add_kv_lora_rank(p.kv_lora)
    _add_head_dims(w, p, kv_layout)
    _add_moe_keys(w, p)
    _add_yarn_keys(w, p)
    if tokenizer is None:
        add_tokenizer(w, kimi_k2_template(thinking), p.vocab)
    else:
        tokenizer()


def _add_head_dims(w: gguf.GGUFWriter, p: Preset, kv_layout: str) -> None:
    if kv_layout == "split":              # MLA: one latent "kv head"
        w.add_head_count_kv(1)
        w.add_key_length(p.kv_lora + p.rope_dim)
        w.add_value_length(p.kv_lora)
        w.add_key_length_mla(p.nope_dim + p.rope_dim)
        w.add_value_length_mla(p.v_dim)
    else:                                 # legacy attn_kv_b: plain multi-head sizes
        w.add_head_count_kv(p.n_head)
        w.add_key_length(p.nope_dim + p.rope_dim)
        w.add_value_length(p.v_dim)


def _add_moe_keys(w: gguf.GGUFWriter, p: Preset) -> None:
    w.add_expert_count(p.n_expert)
    w.add_expert_used_count(p.n_expert_used)
    w.add_expert_shared_count(p.n_shared)
    w.add_expert_feed_forward_length(p.expert_ff)
    w.add_expert_weights_scale(p.weights_scale)
    w.add_expert_weights_norm(p.weights_norm)
    if p.write_gating_key:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType(p.gating))
    w.add_expert_group_count(p.n_group)
    w.add_expert_group_used_count(p.n_group_used)


def _add_yarn_keys(w: gguf.GGUFWriter, p: Preset) -> None:
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(p.yarn_factor)
    w.add_rope_scaling_orig_ctx_len(p.yarn_orig_ctx)
    w.add_rope_scaling_yarn_log_mul(0.1 * p.mscale_all_dim)   # llama.cpp divides by 0.1 again


def copy_metadata(reader: gguf.GGUFReader, w: gguf.GGUFWriter, overrides: dict[str, int] | None = None) -> None:
    """Copy every key of `reader` into `w` (except the ones GGUFWriter writes itself)."""
    overrides = overrides or {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = overrides.get(name, field.contents())
        w.add_key_value(name, value, vtype, sub_type=sub)


def write_streaming(path: Path, fill_metadata: Callable[[gguf.GGUFWriter], None],
                    plan: Sequence[PlannedTensor],
                    produce: Callable[[PlannedTensor], np.ndarray | Iterable[np.ndarray]]) -> None:
    """Write a GGUF whose tensors `produce` makes one at a time, in `plan` order.

    `produce` returns the tensor as one array or as an iterable of byte chunks.
    """
    w, fout = _write_header(path, fill_metadata, plan)
    for t in plan:
        w.write_padding(fout, fout.tell())
        data = produce(t)
        written = 0
        for chunk in [data] if isinstance(data, np.ndarray) else data:
            np.ascontiguousarray(chunk).tofile(fout)
            written += chunk.nbytes
        if written != t.nbytes:
            raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
    w.write_padding(fout, fout.tell())
    w.close()


def write_header_only(path: Path, fill_metadata: Callable[[gguf.GGUFWriter], None],
                      plan: Sequence[PlannedTensor]) -> int:
    """Write header and tensor infos, then extend the file to its full size as a sparse hole."""
    w, fout = _write_header(path, fill_metadata, plan)
    fout.flush()
    total = _pad(fout.tell(), w.data_alignment) + sum(_pad(t.nbytes, w.data_alignment) for t in plan)
    fout.truncate(total)
    w.close()
    return total


def _write_header(path: Path, fill_metadata: Callable[[gguf.GGUFWriter], None],
                  plan: Sequence[PlannedTensor]):
    """Metadata, header and tensor infos written; returns the writer and its open file."""
    w = gguf.GGUFWriter(path, ARCH)
    fill_metadata(w)
    _declare(w, plan)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, w.fout[0]


def _declare(w: gguf.GGUFWriter, plan: Iterable[PlannedTensor]) -> None:
    for t in plan:
        if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t.qtype]
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align
