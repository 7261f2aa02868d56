"""Activation quantization to Q8_K (256-blocks) and Q8_0 (32-blocks), rounding as ggml does.

Q8_K (ggml quantize_row_q8_K_ref): per 256-block take the value of largest magnitude *with its
sign* (`max`), iscale = -127/max, q = nearest_int(iscale * x) (round half to even) capped at
127, d = 1/iscale; bsums = sums of each 16 consecutive q. An all-zero block has d = 0.

Q8_0 (ggml's x86 quantize_row_q8_0): amax = max |x| per 32-block, d = fp16(amax/127),
q = round_half_even(x * 127/amax). We also return the per-block sum of q (the VNNI kernels use it
to undo the +128 bias that turns signed weights into unsigned bytes).
"""

from __future__ import annotations

import numba
import numpy as np

QK_K = 256
QK8_0 = 32


@numba.njit(cache=True, nogil=True)
def _q8k_rows(x, qs, d, bsums):  # x [T, D] f32 -> qs [T, D] i8, d [T, D/256] f32, bsums [T, D/16] i16
    n_tok, dim = x.shape
    for t in range(n_tok):
        for b in range(dim // QK_K):
            base = b * QK_K
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(QK_K):
                v = x[t, base + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                d[t, b] = 0.0
                for j in range(QK_K):
                    qs[t, base + j] = 0
                for g in range(QK_K // 16):
                    bsums[t, b * 16 + g] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            for g in range(QK_K // 16):
                s = 0
                for j in range(16):
                    q = int(np.rint(iscale * x[t, base + g * 16 + j]))
                    q = min(q, 127)
                    qs[t, base + g * 16 + j] = q
                    s += q
                bsums[t, b * 16 + g] = s
            d[t, b] = np.float32(1.0) / iscale


@numba.njit(cache=True, nogil=True)
def _q80_rows(x, qs, d, sums):  # x [T, D] f32 -> qs [T, D] i8, d [T, D/32] f32, sums [T, D/32] i16
    n_tok, dim = x.shape
    for t in range(n_tok):
        for b in range(dim // QK8_0):
            base = b * QK8_0
            amax = np.float32(0.0)
            for j in range(QK8_0):
                amax = max(amax, abs(x[t, base + j]))
            d[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            s = 0
            for j in range(QK8_0):
                q = int(np.rint(x[t, base + j] * inv))
                qs[t, base + j] = q
                s += q
            sums[t, b] = s


def _as_rows(x: np.ndarray, block: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] % block:
        raise ValueError(f"expected [T, D] with D a multiple of {block}, got {x.shape}")
    return x


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize float32 [T, D] rows to Q8_K: (qs int8 [T, D], d f32 [T, D/256], bsums int16 [T, D/16])."""
    x = _as_rows(x, QK_K)
    n_tok, dim = x.shape
    qs = np.empty((n_tok, dim), np.int8)
    d = np.empty((n_tok, dim // QK_K), np.float32)
    bsums = np.empty((n_tok, dim // 16), np.int16)
    _q8k_rows(x, qs, d, bsums)
    return qs, d, bsums


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize float32 [T, D] rows to Q8_0: (qs int8 [T, D], d f32 [T, D/32] fp16-rounded, sums int16 [T, D/32])."""
    x = _as_rows(x, QK8_0)
    n_tok, dim = x.shape
    qs = np.empty((n_tok, dim), np.int8)
    d = np.empty((n_tok, dim // QK8_0), np.float32)
    sums = np.empty((n_tok, dim // QK8_0), np.int16)
    _q80_rows(x, qs, d, sums)
    d = d.astype(np.float16).astype(np.float32)  # block_q8_0 stores d as fp16
    return qs, d, sums


def dequantize_q8_k(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Float32 values represented by Q8_K blocks (for tests and the dequantize fallback)."""
    n_tok, dim = qs.shape
    return (qs.reshape(n_tok, -1, QK_K).astype(np.float32) * d[:, :, None]).reshape(n_tok, dim)


def dequantize_q8_0(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Float32 values represented by Q8_0 blocks."""
    n_tok, dim = qs.shape
    return (qs.reshape(n_tok, -1, QK8_0).astype(np.float32) * d[:, :, None]).reshape(n_tok, dim)
