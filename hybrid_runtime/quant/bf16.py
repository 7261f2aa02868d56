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
from hybrid_runtime.quant.kernels import K_Q4_K, K_Q5_K, K_Q6_K, K_Q8_0, f16, scale_min_k4  # noqa: E402


@numba.njit(cache=True, nogil=True, inline="always")
def _q4k_block(w, wo, out, oo):
    d, dmin = f16(w, wo), f16(w, wo + 2)
    for c in range(4):
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        d1, mn1, d2, mn2 = d * np.float32(sc1), dmin * np.float32(m1), d * np.float32(sc2), dmin * np.float32(m2)
        for l in range(32):
            q = w[wo + 16 + 32 * c + l]
            out[oo + 64 * c + l] = bf16_bits(d1 * np.float32(q & 15) - mn1)
            out[oo + 64 * c + 32 + l] = bf16_bits(d2 * np.float32(q >> 4) - mn2)


@numba.njit(cache=True, nogil=True, inline="always")
def _q5k_block(w, wo, out, oo):
    d, dmin = f16(w, wo), f16(w, wo + 2)
    for c in range(4):
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        d1, mn1, d2, mn2 = d * np.float32(sc1), dmin * np.float32(m1), d * np.float32(sc2), dmin * np.float32(m2)
        for l in range(32):
            q = np.int32(w[wo + 48 + 32 * c + l])
            h = np.int32(w[wo + 16 + l]) >> (2 * c)
            out[oo + 64 * c + l] = bf16_bits(d1 * np.float32((q & 15) | ((h & 1) << 4)) - mn1)
            out[oo + 64 * c + 32 + l] = bf16_bits(d2 * np.float32((q >> 4) | ((h & 2) << 3)) - mn2)


@numba.njit(cache=True, nogil=True, inline="always")
def _q6k_block(w, wo, out, oo):
    # 210 bytes: ql[128] | qh[64] | scales int8[16] | d f16. Per half n of 128 values and l < 32:
    # value 128n + 32k + l = (4 low bits of ql, 2 bits of qh at 2k) - 32, scale 8n + 2k + l // 16
    d = f16(w, wo + 208)
    for n in range(2):
        for hh in range(2):
            s = wo + 192 + 8 * n + hh
            d0 = d * np.float32(np.int8(w[s]))
            d1 = d * np.float32(np.int8(w[s + 2]))
            d2 = d * np.float32(np.int8(w[s + 4]))
            d3 = d * np.float32(np.int8(w[s + 6]))
            o = oo + 128 * n + 16 * hh
            for i in range(16):
                l = 16 * hh + i
                ql0 = np.int32(w[wo + 64 * n + l])
                ql1 = np.int32(w[wo + 64 * n + 32 + l])
                qh = np.int32(w[wo + 128 + 32 * n + l])
                out[o + i] = bf16_bits(d0 * np.float32(((ql0 & 15) | ((qh & 3) << 4)) - 32))
                out[o + 32 + i] = bf16_bits(d1 * np.float32(((ql1 & 15) | (((qh >> 2) & 3) << 4)) - 32))
                out[o + 64 + i] = bf16_bits(d2 * np.float32(((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32))
                out[o + 96 + i] = bf16_bits(d3 * np.float32(((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32))


@numba.njit(cache=True, nogil=True, inline="always")
def _q80_block(w, wo, out, oo):
    d = f16(w, wo)
    for l in range(32):
        out[oo + l] = bf16_bits(d * np.float32(np.int8(w[wo + 2 + l])))


@numba.njit(cache=True, nogil=True, parallel=True)
def _dequantize_bf16(kind, w, out):  # w [R, RB] u8 -> out [R, C] u16 (bf16 bits)
    for r in prange(w.shape[0]):
        row, dst = w[r], out[r]
        if kind == K_Q8_0:
            for b in range(dst.shape[0] // 32):
                _q80_block(row, 34 * b, dst, 32 * b)
        elif kind == K_Q4_K:
            for b in range(dst.shape[0] // 256):
                _q4k_block(row, 144 * b, dst, 256 * b)
        elif kind == K_Q5_K:
            for b in range(dst.shape[0] // 256):
                _q5k_block(row, 176 * b, dst, 256 * b)
        else:
            for b in range(dst.shape[0] // 256):
                _q6k_block(row, 210 * b, dst, 256 * b)


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
        _dequantize_bf16(_KINDS[qtype], w, out)
    else:  # any other type gguf can read, through float32
        from gguf.quants import dequantize

        _f32_to_bf16(np.ascontiguousarray(dequantize(np.ascontiguousarray(w), qtype), np.float32), out)
    return out


def as_bf16(bits: np.ndarray):
    """A torch bfloat16 view of uint16 bf16 bit patterns (no copy)."""
    import torch

    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


_BUFFERS: dict[str, np.ndarray] = {}


def bf16_buffer(name: str, rows: int, cols: int) -> np.ndarray:
    """A reused uint16 [rows, cols] buffer (a fresh 10 MB array per call would cost its page
    faults); one per name, so callers that hold two at once use two names."""
    buf = _BUFFERS.get(name)
    if buf is None or buf.size < rows * cols:
        buf = _BUFFERS[name] = np.empty(rows * cols, np.uint16)
    return buf[: rows * cols].reshape(rows, cols)
