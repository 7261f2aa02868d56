"""Tiny deepseek2 models: random float weights, llama.cpp's quantizer, and an F32 twin.

The twin holds the quantized file's values dequantized to F32 under the same names and
metadata: llama.cpp on the twin is the exact oracle for a float path reading the quantized file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.synth.layout import KV_LAYOUTS, TensorSpec, tensor_specs
from hybrid_runtime.synth.presets import Preset, get_preset
from hybrid_runtime.synth.writer import PlannedTensor, add_model_metadata, copy_metadata, write_streaming

F32 = gguf.GGMLQuantizationType.F32
MAX_FLOAT_PARAMS = 1_000_000_000
# quant name -> llama_ftype value (llama.h `enum llama_ftype`)
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}


def make_tiny_model(preset: str | Preset, quant: str, out: str | os.PathLike, seed: int = 0,
                    f32_twin: str | os.PathLike | None = None, kv_layout: str | None = None,
                    tied_output: bool = False, thinking: bool | str = False,
                    gating_key: bool = True) -> Path:
    """Write a random deepseek2 GGUF at `quant` (e.g. "Q4_K_M") to `out` and return its path.

    `f32_twin` also writes the quantized values dequantized to F32. `kv_layout` is "split"
    (attn_k_b/attn_v_b) or "combined" (legacy attn_kv_b); None takes the preset's default.
    `gating_key=False` omits deepseek2.expert_gating_func (llama.cpp then assumes softmax).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if not gating_key:
        p = p.replace(write_gating_key=False)
    kv_layout = kv_layout or p.kv_layout
    _check_args(quant, kv_layout)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(p, kv_layout, tied_output)
    n_params = sum(int(np.prod(s.shape)) for s in specs)
    if n_params > MAX_FLOAT_PARAMS:
        raise InvalidRequestError(f"Preset {p.name!r} has {n_params / 1e9:.1f} B parameters, too many for a "
                                  "float original; use scripts/make_scale_model.py.")
    return write_quantized(out, quant, lambda path: write_float_model(path, p, specs, kv_layout, seed, thinking),
                           f32_twin)


def write_quantized(out: Path, quant: str, write_float: Callable[[Path], None], f32_twin=None) -> Path:
    """`write_float(path)` writes the float model; quantized into `out` by llama.cpp's quantizer
    (the float file is a temporary unless quant is F32), with the optional F32 twin."""
    float_path = out if quant == "F32" else out.with_name(out.name + ".f32.tmp")
    try:
        write_float(float_path)
        if quant != "F32":
            quantize(float_path, out, quant)
    finally:
        if float_path != out:
            float_path.unlink(missing_ok=True)
    if f32_twin is not None:
        write_f32_twin(out, Path(f32_twin))
    return out


def _check_args(quant: str, kv_layout: str) -> None:
    if quant not in FTYPES:
        raise InvalidRequestError(f"Unknown quant {quant!r}; choose one of {', '.join(FTYPES)}.")
    if kv_layout not in KV_LAYOUTS:
        raise InvalidRequestError(f"kv layout must be one of {', '.join(KV_LAYOUTS)}, not {kv_layout!r}.")


def write_float_model(path: Path, p: Preset, specs: list[TensorSpec], kv_layout: str,
                      seed: int, thinking: bool | str) -> None:
    """Write the random F32 model (every tensor drawn independently from `seed` and its name)."""
    by_name = {s.name: s for s in specs}
    plan = [PlannedTensor(s.name, s.shape, F32) for s in specs]
    write_streaming(
        path,
        lambda w: add_model_metadata(w, p, kv_layout, FTYPES["F32"], thinking),
        plan,
        lambda t: random_tensor(by_name[t.name], seed),
    )


def random_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """Random values for one tensor; scales keep a random network tame under llama.cpp's
    activation quantization (design.md §3.7)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    x = rng.standard_normal(spec.shape, dtype=np.float32)
    match spec.role:
        case "norm":
            return 1.0 + 0.1 * x
        case "bias":
            return 0.1 * x
        case "embed":
            return 0.5 * x
        case "output":
            return x * np.float32(2.0 / np.sqrt(spec.fan_in))
        case "router":
            return x * np.float32(1.0 / np.sqrt(spec.fan_in))
        case "k_b":                                  # (H, kv_lora, nope): contracts over kv_lora
            return x * np.float32(0.5 / np.sqrt(spec.shape[1]))
        case _:
            return x * np.float32(0.5 / np.sqrt(spec.fan_in))


def quantize(src: Path, dst: Path, quant: str, n_threads: int | None = None) -> None:
    """Quantize `src` into `dst` with llama.cpp's own quantizer (its default parameters)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)                               # the quantizer logs every tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = n_threads or min(2, os.cpu_count() or 1)
    with _captured_stderr() as log:                  # fallback warnings go straight to fd 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        tail = "".join(log)[-2000:]
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {quant}) failed with code {rc}:\n{tail}")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Send file descriptor 2 (C code's stderr) to a temporary file; the list gets its text."""
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def write_f32_twin(quantized: Path, twin: Path) -> Path:
    """Write `twin`: `quantized`'s metadata and tensor names, every tensor dequantized to F32."""
    reader = gguf.GGUFReader(quantized)
    tensors = {t.name: t for t in reader.tensors}
    plan = [PlannedTensor(t.name, tuple(int(n) for n in reversed(t.shape)), F32) for t in reader.tensors]
    twin.parent.mkdir(parents=True, exist_ok=True)
    write_streaming(
        twin,
        lambda w: copy_metadata(reader, w, {"general.file_type": FTYPES["F32"]}),
        plan,
        lambda t: dequantized(tensors[t.name]),
    )
    return twin


def dequantized(t: gguf.ReaderTensor) -> np.ndarray:
    """One tensor of a GGUFReader as float32 in numpy order (reversed ggml ne)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
