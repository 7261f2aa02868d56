"""RoPE angles as llama.cpp's CPU backend computes them (ggml's rope cache, float32).

The angle of pair i at position p is not p * base^(-2i/R) exactly: ggml starts from theta = p
and multiplies by theta_scale = powf(base, -2/R) once per pair, each product rounded to float32,
then blends the interpolated (freq_scale * theta) and extrapolated angles with the YaRN ramp, in
float32. At position 300 the exact angle is ~1e-5 rad away from that; on a quantized model each
such difference flips activation roundings that llama.cpp does not flip. The reference below is a
scalar float32 loop per (position, pair), written from that description.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybrid_runtime.layers import Rope

f32 = np.float32


def ggml_rope_pair_angles(pos: int, n_dims: int, base: float, factor: float, orig_ctx: int,
                          beta_fast: float, beta_slow: float, yarn: bool) -> list[float]:
    """One position's R/2 angles, scalar float32 as ggml's rope cache (ext_factor 1 with YaRN)."""
    def corr_dim(beta: float) -> float:
        return n_dims * math.log(orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
    theta_scale = f32(math.pow(f32(base), -2.0 / n_dims))
    freq_scale = f32(1.0 / factor)
    theta, out = f32(pos), []
    for i in range(n_dims // 2):
        theta_interp = f32(freq_scale * theta)
        if yarn:
            y = f32(f32(i - low) / f32(max(0.001, high - low)))
            mix = f32(1.0 - min(1.0, max(0.0, float(y))))
            out.append(float(f32(f32(theta_interp * f32(1.0 - mix)) + f32(theta * mix))))
        else:
            out.append(float(theta_interp))
        theta = f32(theta * theta_scale)
    return out


CASES = [  # (R, base, scaling, factor, beta_fast, beta_slow): Kimi K2, DeepSeek-V3, the tiny preset, linear
    (64, 50000.0, "yarn", 32.0, 1.0, 1.0),
    (64, 10000.0, "yarn", 40.0, 32.0, 1.0),
    (32, 50000.0, "yarn", 32.0, 1.0, 1.0),
    (32, 10000.0, "linear", 4.0, 32.0, 1.0),
]


@pytest.mark.parametrize("n_dims,base,scaling,factor,beta_fast,beta_slow", CASES)
def test_rope_angles_follow_ggml_float32_arithmetic(n_dims, base, scaling, factor, beta_fast, beta_slow):
    rng = np.random.default_rng()
    rope = Rope(n_dims, base, scaling, factor, 4096, beta_fast, beta_slow)
    pos = np.concatenate([[0, 1], rng.integers(2, 8192, 30)])
    x = torch.from_numpy(rng.standard_normal((len(pos), 3, n_dims), dtype=np.float32))  # [T, H, R]
    out = rope(x, torch.from_numpy(pos)).numpy()
    for t, p in enumerate(pos):
        angle = np.array(ggml_rope_pair_angles(int(p), n_dims, base, factor, 4096, beta_fast, beta_slow,
                                               scaling == "yarn"), np.float64)  # [R/2]
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        x0, x1 = x[t, :, 0::2].numpy(), x[t, :, 1::2].numpy()
        want = np.empty_like(x[t].numpy())
        want[:, 0::2], want[:, 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        # float32 products and sums of |x| ~ 3: a few ulps; the float64 angle was ~1e-4 off at p ~ 8000
        np.testing.assert_allclose(out[t], want, rtol=0, atol=3e-6, err_msg=f"position {p}")
