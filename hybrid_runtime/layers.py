"""Building blocks shared by architectures: RMSNorm, SwiGLU FFN, RoPE (NORM mode) with YaRN."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu_ffn(h: torch.Tensor, gate, up, down) -> torch.Tensor:
    return down(F.silu(gate(h)) * up(h))


def _yarn_corr_dim(n_dims: int, n_ctx_orig: int, beta: float, base: float) -> float:
    return n_dims * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))


class Rope:
    """Rotary embedding on adjacent pairs (llama.cpp NORM mode), with YaRN frequency blending.

    With YaRN each pair i blends the interpolated (pos * scale) and extrapolated angle by a ramp
    between the correction dims of beta_fast and beta_slow. The cos/sin magnitude stays 1: the
    attention scale carries mscale (see ModelConfig.attn_scale).

    The angles are computed as ggml's CPU rope cache computes them, in float32: theta starts at
    the position and is multiplied by base^(-2/R) once per pair, then blended (float32), then
    cos/sin. The exact float64 angle differs from that by up to ~1e-5 rad at position 300 (the
    repeated product's rounding): enough to flip activation roundings llama.cpp does not flip
    (docs/benchmarks.md, Fidelity).
    """

    def __init__(self, n_dims: int, base: float, scaling: str, factor: float, orig_ctx: int,
                 beta_fast: float, beta_slow: float):
        half = n_dims // 2
        self.theta_scale = np.float32(math.pow(np.float32(base), -2.0 / n_dims))  # powf(base, -2/R)
        self.freq_scale = np.float32(1.0)
        self.extrapolate = np.ones(half, np.float32)  # [R/2] ramp: 1 extrapolate, 0 interpolate
        if scaling == "linear" and factor > 1.0:
            self.freq_scale, self.extrapolate = np.float32(1.0 / factor), np.zeros(half, np.float32)
        elif scaling not in ("none", "linear") and factor > 1.0:
            i = np.arange(half, dtype=np.float32)
            lo = max(0.0, math.floor(_yarn_corr_dim(n_dims, orig_ctx, beta_fast, base)))
            hi = min(n_dims - 1.0, math.ceil(_yarn_corr_dim(n_dims, orig_ctx, beta_slow, base)))
            ramp = (i - np.float32(lo)) / np.float32(max(0.001, hi - lo))
            self.freq_scale, self.extrapolate = np.float32(1.0 / factor), 1 - np.clip(ramp, 0, 1)
        self._cos = self._sin = torch.empty(0, half)

    def _table(self, n: int) -> None:
        """cos/sin for positions 0..n-1 in ggml's float32 arithmetic, kept (grown by doubling)."""
        n = max(n, 2 * self._cos.shape[0], 256)
        theta = np.arange(n, dtype=np.float32)  # [n] the extrapolated angle of pair 0 = position
        angle = np.empty((n, self.extrapolate.shape[0]), np.float32)  # [n, R/2]
        for i, mix in enumerate(self.extrapolate):
            interp = self.freq_scale * theta
            angle[:, i] = interp * (np.float32(1) - mix) + theta * mix
            theta = theta * self.theta_scale
        a = angle.astype(np.float64)  # cosf/sinf of a float angle, correctly rounded
        self._cos = torch.from_numpy(np.cos(a).astype(np.float32))
        self._sin = torch.from_numpy(np.sin(a).astype(np.float32))

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [T, H, R] at positions pos [T] -> rotated x (pairs (2i, 2i+1))."""
        if int(pos.max()) >= self._cos.shape[0]:
            self._table(int(pos.max()) + 1)
        cos = self._cos[pos].to(device=x.device, dtype=x.dtype)[:, None, :]  # [T, 1, R/2]
        sin = self._sin[pos].to(device=x.device, dtype=x.dtype)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out
