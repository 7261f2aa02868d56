"""Building blocks shared by architectures: RMSNorm, SwiGLU FFN, RoPE (NORM mode) with YaRN."""

from __future__ import annotations

import math

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
    """

    def __init__(self, n_dims: int, base: float, scaling: str, factor: float, orig_ctx: int,
                 beta_fast: float, beta_slow: float):
        i = torch.arange(n_dims // 2, dtype=torch.float64)
        theta_extrap = base ** (-2.0 * i / n_dims)  # [R/2]
        if scaling == "none" or factor <= 1.0:
            self.freq = theta_extrap
        elif scaling == "linear":
            self.freq = theta_extrap / factor
        else:
            lo = max(0.0, math.floor(_yarn_corr_dim(n_dims, orig_ctx, beta_fast, base)))
            hi = min(n_dims - 1.0, math.ceil(_yarn_corr_dim(n_dims, orig_ctx, beta_slow, base)))
            ramp = 1.0 - ((i - lo) / max(0.001, hi - lo)).clamp(0.0, 1.0)  # 1: extrapolate, 0: interpolate
            self.freq = theta_extrap / factor * (1.0 - ramp) + theta_extrap * ramp
        self._cos = self._sin = torch.empty(0, n_dims // 2)

    def _table(self, n: int) -> None:
        """cos/sin for positions 0..n-1, computed in float64 and kept (grown by doubling)."""
        n = max(n, 2 * self._cos.shape[0], 256)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * self.freq[None, :]  # [n, R/2]
        self._cos, self._sin = angle.cos().float(), angle.sin().float()

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
