"""Activation rounding as llama.cpp's CPU backend applies it before each quantized matmul.

ggml multiplies a weight of type W with activations converted to W's `vec_dot_type`:
K-quants -> Q8_K (blocks of 256, one float scale), Q4_0/Q5_0/Q8_0 -> Q8_0 and Q4_1/Q5_1 -> Q8_1
(blocks of 32, an fp16 scale), F16 -> f16, BF16 -> bf16, F32 -> none. The integer dot of the
two block streams equals the float dot of their dequantized values, so `round_activations(x, W)`
followed by a float matmul with the dequantized weight reproduces llama.cpp's products up to
summation order. That is what makes our default path comparable with llama.cpp statistically.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

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


def round_activations(x: torch.Tensor, weight_type: Q) -> torch.Tensor:
    """x [..., n] float32 -> the values llama.cpp's kernels see for a weight of `weight_type`."""
    kind = vec_dot_type(weight_type)
    n = x.shape[-1]
    if kind == "q8_k" and n % 256 == 0:
        return _q8_k(x.float())
    if kind == "q8_0" and n % 32 == 0:
        return _q8_0(x.float())
    if kind == "f16":
        return x.half().float()
    if kind == "bf16":
        return x.bfloat16().float()
    return x
