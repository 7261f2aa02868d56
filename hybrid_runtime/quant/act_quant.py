"""Activation rounding as llama.cpp's CPU backend applies it before each quantized matmul.

ggml multiplies a weight of type W with activations converted to W's `vec_dot_type`:
K-quants -> Q8_K (blocks of 256, one float scale), Q4_0/Q5_0/Q8_0 -> Q8_0 and Q4_1/Q5_1 -> Q8_1
(blocks of 32, an fp16 scale), F16 -> f16, BF16 -> bf16, F32 -> none. The integer dot of the
two block streams equals the float dot of their dequantized values, so `round_activations(x, W)`
followed by a float matmul with the dequantized weight reproduces llama.cpp's products up to
summation order. That is what makes our default path comparable with llama.cpp statistically.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from numba import prange

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()

from hybrid_runtime.quant.floatbits import f16_round  # noqa: E402

Q8_K_TYPES = frozenset({Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
Q8_0_TYPES = frozenset({Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_1, Q.Q5_1})


def vec_dot_type(weight_type: Q) -> str:
    if weight_type in Q8_K_TYPES:
        return "q8_k"
    if weight_type in Q8_0_TYPES:
        return "q8_0"
    return {Q.F16: "f16", Q.BF16: "bf16"}.get(weight_type, "f32")


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 256: iscale = -127 / (the value of largest magnitude), q = round-half-even, q <= 127."""
    b = x.reshape(-1, 256)  # [B, 256]
    idx = b.abs().argmax(-1, keepdim=True)  # first index of the largest |x|, as ggml's strict '>'
    vmax = b.gather(-1, idx)  # [B, 1], signed
    iscale = torch.where(vmax != 0, -127.0 / vmax, torch.zeros_like(vmax))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(vmax != 0, 1.0 / iscale, torch.zeros_like(vmax))
    return (q * d).reshape(x.shape)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: d = amax/127 stored as fp16, q = round(x * 127/amax) (the AVX path's rounding)."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    ok = amax > 0
    q = torch.round(b * torch.where(ok, 127.0 / amax, torch.zeros_like(amax)))
    d = (amax / 127.0).half().float()
    return (q * d).reshape(x.shape)


@numba.njit(cache=True, nogil=True, parallel=True)
def _round_q8_k_blocks(b, out):  # b, out f32 [B, 256]: _q8_k in one pass
    for i in prange(b.shape[0]):
        amax, vmax = np.float32(0.0), np.float32(0.0)
        for j in range(256):
            if abs(b[i, j]) > amax:
                amax, vmax = abs(b[i, j]), b[i, j]
        if amax == 0:
            out[i, :] = 0.0
            continue
        iscale = np.float32(-127.0) / vmax
        d = np.float32(1.0) / iscale
        for j in range(256):
            out[i, j] = np.float32(min(np.rint(iscale * b[i, j]), np.float32(127.0))) * d


@numba.njit(cache=True, nogil=True, parallel=True)
def _round_q8_0_blocks(b, out):  # b, out f32 [B, 32]: _q8_0 in one pass
    for i in prange(b.shape[0]):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(b[i, j]))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        d = f16_round(amax / np.float32(127.0))
        for j in range(32):
            out[i, j] = np.rint(b[i, j] * inv) * d


def _round_blocks(x: torch.Tensor, block: int) -> torch.Tensor | None:
    """The Numba twin of _q8_k / _q8_0 (same values, one pass) for contiguous float32 CPU tensors."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
        return None
    b = x.numpy().reshape(-1, block)
    out = np.empty_like(b)
    (_round_q8_k_blocks if block == 256 else _round_q8_0_blocks)(b, out)
    return torch.from_numpy(out).reshape(x.shape)


def round_activations(x: torch.Tensor, weight_type: Q) -> torch.Tensor:
    """x [..., n] float32 -> the values llama.cpp's kernels see for a weight of `weight_type`."""
    kind = vec_dot_type(weight_type)
    n = x.shape[-1]
    if kind == "q8_k" and n % 256 == 0:
        fast = _round_blocks(x, 256)
        return fast if fast is not None else _q8_k(x.float())
    if kind == "q8_0" and n % 32 == 0:
        fast = _round_blocks(x, 32)
        return fast if fast is not None else _q8_0(x.float())
    if kind == "f16":
        return x.half().float()
    if kind == "bf16":
        return x.bfloat16().float()
    return x
