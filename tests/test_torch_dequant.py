"""torch dequantization of raw GGUF blocks against gguf.quants.dequantize (bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from hybrid_runtime.errors import UnsupportedModelError
from hybrid_runtime.quant.torch_dequant import dequantize

# offsets of the fp16 scale fields (d, and dmin / m where present) inside one block
_F16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_blocks(rng: np.random.Generator, qtype: Q, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random valid blocks: random bytes, fp16 scale fields set to sane random values."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = rng.uniform(-0.1, 0.1, size=(n_rows, n_blocks)).astype(np.float16)
        raw[..., off : off + 2] = scale.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return raw.reshape(n_rows, n_blocks * size)


@pytest.mark.parametrize("qtype", list(_F16_FIELDS), ids=lambda q: q.name)
def test_block_types_match_gguf_bit_for_bit(qtype: Q):
    rng = np.random.default_rng()
    raw = random_blocks(rng, qtype, n_rows=5, n_blocks=3)
    want = gguf_quants.dequantize(raw, qtype).astype(np.float32)
    got = dequantize(torch.from_numpy(raw), qtype).numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
def test_leading_dims_and_dtype(qtype: Q):
    rng = np.random.default_rng()
    raw = random_blocks(rng, qtype, n_rows=6, n_blocks=2).reshape(2, 3, -1)  # [E, rows, bytes]
    want = gguf_quants.dequantize(raw, qtype).astype(np.float32)
    got = dequantize(torch.from_numpy(raw), qtype, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.float().numpy(), torch.from_numpy(want).bfloat16().float().numpy())


def test_float_types():
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert torch.equal(dequantize(torch.from_numpy(x), Q.F32), torch.from_numpy(x))
    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(torch.from_numpy(h), Q.F16).numpy(), h.astype(np.float32))
    bf_bytes = gguf_quants.quantize(x, Q.BF16)  # uint8 [4, 128]
    want = gguf_quants.dequantize(bf_bytes, Q.BF16)
    np.testing.assert_array_equal(dequantize(torch.from_numpy(bf_bytes), Q.BF16).numpy(), want)


def test_unsupported_type_is_a_user_error():
    with pytest.raises(UnsupportedModelError):
        dequantize(torch.zeros(1, 66, dtype=torch.uint8), Q.IQ2_XXS)
