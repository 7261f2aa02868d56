"""Raw GGUF blocks dequantized straight to bf16 (for the AMX/oneDNN bf16 matmuls of prefill).

`dequantize_bf16(qtype, w, out)` writes the bf16 bit patterns (uint16, round to nearest even) of
the values of raw blocks w uint8 [R, row_bytes] into out uint16 [R, C]; `as_bf16(out)` views
that as a torch bfloat16 tensor without a copy. The values are first computed in float32 exactly
as gguf's dequantizer does, then rounded once: one pass over the weights, no float32 copy.
The inner loops are written so that LLVM vectorizes them (32 or 16 lanes, loop-invariant scales).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import prange

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()

from hybrid_runtime.quant.floatbits import bf16_bits  # noqa: E402
from hybrid_runtime.quant.kernels import K_Q4_K, K_Q5_K, K_Q6_K, K_Q8_0, dequantize_rows_into  # noqa: E402


@numba.njit(cache=True, nogil=True, parallel=True)
def _f32_to_bf16(x, out):  # x f32 [R, C] -> out u16 [R, C]
    for r in prange(x.shape[0]):
        for c in range(x.shape[1]):
            out[r, c] = bf16_bits(x[r, c])


_KINDS = {QT.Q4_K: K_Q4_K, QT.Q5_K: K_Q5_K, QT.Q6_K: K_Q6_K, QT.Q8_0: K_Q8_0}


def dequantize_bf16(qtype: QT, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bf16 bits of raw blocks w uint8 [R, row_bytes] (or float32/float16 [R, C]) into out uint16 [R, C]."""
    if w.dtype in (np.float32, np.float16):
        _f32_to_bf16(np.ascontiguousarray(w, np.float32), out)
    elif qtype in _KINDS:
        dequantize_rows_into(_KINDS[qtype], w, out)
    else:  # any other type gguf can read, through float32
        from gguf.quants import dequantize

        _f32_to_bf16(np.ascontiguousarray(dequantize(np.ascontiguousarray(w), qtype), np.float32), out)
    return out


def as_bf16(bits: np.ndarray):
    """A torch bfloat16 view of uint16 bf16 bit patterns (no copy)."""
    import torch

    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


_BUFFERS: dict[tuple[str, str], np.ndarray] = {}


def reused_buffer(name: str, rows: int, cols: int, dtype=np.uint16) -> np.ndarray:
    """A reused [rows, cols] buffer (a fresh 10-30 MB array per call would cost its page faults,
    and above glibc's mmap threshold it gets them every time); one per name and dtype, so callers
    that hold two at once use two names."""
    key = (name, np.dtype(dtype).str)
    buf = _BUFFERS.get(key)
    if buf is None or buf.size < rows * cols:
        buf = _BUFFERS[key] = np.empty(rows * cols, dtype)
    return buf[: rows * cols].reshape(rows, cols)


def bf16_buffer(name: str, rows: int, cols: int) -> np.ndarray:
    """A reused uint16 [rows, cols] buffer of bf16 bits (reused_buffer)."""
    return reused_buffer(name, rows, cols, np.uint16)
