"""Two independent renditions of llama.cpp's activation rounding must agree: the torch fake-quant
used by the float paths (quant/act_quant.py) and the Numba quantizer feeding the integer kernels
(quant/q8k.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from hybrid_runtime.quant.act_quant import round_activations, vec_dot_type
from hybrid_runtime.quant.q8k import quantize_q8_0, quantize_q8_k


def _x(rng, T, D):
    x = rng.normal(size=(T, D)).astype(np.float32) * rng.uniform(0.01, 10)
    x[0, :256] = 0.0  # an all-zero block
    return x


@pytest.mark.parametrize("T", [1, 3, 8])
def test_q8_k_fake_quant_equals_numba_quantizer(T):
    rng = np.random.default_rng()
    x = _x(rng, T, 1024)
    qs, d, _ = quantize_q8_k(x)[:3]
    ours = round_activations(torch.from_numpy(x), Q.Q4_K).numpy().reshape(T, -1, 256)
    safe_d = np.where(d == 0, 1, d)[:, :, None]
    np.testing.assert_array_equal(np.rint(ours / safe_d).astype(np.int64), qs.reshape(T, -1, 256))
    np.testing.assert_allclose(ours, qs.reshape(T, -1, 256) * d[:, :, None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("T", [1, 5])
def test_q8_0_fake_quant_equals_numba_quantizer(T):
    rng = np.random.default_rng()
    x = _x(rng, T, 512)
    qs, d = quantize_q8_0(x)[:2]
    ours = round_activations(torch.from_numpy(x), Q.Q8_0).numpy().reshape(T, -1, 32)
    safe_d = np.where(d == 0, 1, d).reshape(T, -1, 1)
    np.testing.assert_array_equal(np.rint(ours / safe_d).astype(np.int64), qs.reshape(T, -1, 32))


def test_vec_dot_types_follow_ggml():
    assert vec_dot_type(Q.Q6_K) == vec_dot_type(Q.Q2_K) == "q8_k"
    assert vec_dot_type(Q.Q5_0) == vec_dot_type(Q.Q4_1) == "q8_0"
    assert vec_dot_type(Q.F16) == "f16" and vec_dot_type(Q.F32) == "f32"


@pytest.mark.parametrize("T", [1, 4])
def test_compiled_step_quantizers_equal_the_reference_ones(T):
    """The compiled step's row quantizers (cpu/rows.py) give the same bits as q8k.py's: Q8_K values,
    scales and sums per 16, the nibble-ordered copy, and Q8_0."""
    from hybrid_runtime.cpu.rows import quantize_rows
    from hybrid_runtime.quant.kernels import nibble_order

    rng = np.random.default_rng()
    D = 256 * int(rng.integers(1, 5))
    x = _x(rng, T, D)
    x[-1, 3] = -np.abs(x[-1]).max() * 1.5  # the largest magnitude negative in one block
    x[-1, 7] = -x[-1, 3]                   # and a tie of opposite sign after it: the first one wins
    kq, kn = np.zeros((T, D), np.int8), np.zeros((T, D), np.int8)
    kd, ks = np.zeros((T, D // 256), np.float32), np.zeros((T, D // 16), np.int16)
    zq, zd, zs = np.zeros((T, D), np.int8), np.zeros((T, D // 32), np.float32), np.zeros((T, D // 32), np.int16)
    quantize_rows(x, T, D, 3, kq, kn, kd, ks, zq, zd, zs)
    qs, d, bsums = quantize_q8_k(x)
    np.testing.assert_array_equal(kq, qs)
    np.testing.assert_array_equal(kd, d)
    np.testing.assert_array_equal(ks, bsums)
    np.testing.assert_array_equal(kn, nibble_order(qs))
    q0, d0, s0 = quantize_q8_0(x)
    np.testing.assert_array_equal(zq, q0)
    np.testing.assert_array_equal(zd, d0)
    np.testing.assert_array_equal(zs, s0)
