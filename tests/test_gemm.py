"""The panel GEMM (quant/gemm.py) against gguf's dequantize and float64 products, fresh random
inputs; and its per-token results independent of the other tokens in the call."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from hybrid_runtime.quant.cpu_features import has_avx512_vnni
from hybrid_runtime.quant.q8k import dequantize_q8_0, dequantize_q8_k

from test_quant_kernels import random_blocks, rel_l2

pytestmark = pytest.mark.skipif(not has_avx512_vnni(), reason="the panel GEMM needs AVX-512 VNNI")
TYPES = [QT.Q4_K, QT.Q6_K, QT.Q8_0]


def _run(qtype, raw, x, tok, n_threads=2):
    from hybrid_runtime.quant import gemm
    acts = gemm.quantize_acts(qtype, x)
    rows = raw.shape[0]
    pad = 3  # output columns before and after: the kernel writes only its own
    y = np.full((len(tok), rows + 2 * pad), np.nan, np.float32)
    panels = gemm.scratch_panels(n_threads, x.shape[1] // 256)
    gemm.gemm_tokens(gemm.GEMM_KINDS[qtype.name], raw.reshape(-1), 0, raw.shape[1], rows, x.shape[1] // 256,
                     *acts, np.asarray(tok, np.int64), y, pad, panels)
    assert np.isnan(y[:, :pad]).all() and np.isnan(y[:, pad + rows:]).all()
    deq = dequantize_q8_0(acts[0], acts[2]) if qtype == QT.Q8_0 else dequantize_q8_k(acts[0], acts[2])
    return y[:, pad: pad + rows], deq.astype(np.float64)


@pytest.mark.parametrize("qtype", TYPES)
def test_panel_gemm_matches_float64(qtype):
    rng = np.random.default_rng()
    rows, cols = 16 * int(rng.integers(1, 9)), 256 * int(rng.integers(1, 5))
    n_tok = int(rng.integers(1, 40))
    raw = random_blocks(qtype, rows, cols, rng)
    x = rng.standard_normal((n_tok + 3, cols)).astype(np.float32)
    tok = rng.integers(0, n_tok + 3, n_tok)  # gathered, repeats allowed
    y, xq = _run(qtype, raw, x, tok)
    exact = xq[tok] @ dequantize(raw, qtype).astype(np.float64).T
    assert rel_l2(y, exact) < 2e-6


@pytest.mark.parametrize("qtype", TYPES)
def test_panel_gemm_matches_the_row_kernels(qtype):
    from hybrid_runtime.quant import kernels

    rng = np.random.default_rng()
    rows, cols = 48, 768
    raw = random_blocks(qtype, rows, cols, rng)
    x = rng.standard_normal((11, cols)).astype(np.float32)
    y, _ = _run(qtype, raw, x, np.arange(11))
    assert rel_l2(y, kernels.matmul(qtype, raw, x).astype(np.float64)) < 1e-6


@pytest.mark.parametrize("qtype", TYPES)
def test_a_tokens_result_does_not_depend_on_the_others(qtype):
    rng = np.random.default_rng()
    rows, cols = 32, 512
    raw = random_blocks(qtype, rows, cols, rng)
    x = rng.standard_normal((21, cols)).astype(np.float32)
    alone = np.stack([_run(qtype, raw, x, [t])[0][0] for t in range(21)])
    together, _ = _run(qtype, raw, x, np.arange(21))
    assert np.array_equal(alone, together)
    shuffled = rng.permutation(21)
    y, _ = _run(qtype, raw, x, shuffled, n_threads=1)
    assert np.array_equal(y, alone[shuffled])


def test_supports_only_whole_panels_and_blocks():
    from hybrid_runtime.quant import gemm

    assert gemm.supports(QT.Q4_K, 32, 512) and gemm.supports(QT.Q8_0, 576, 2048)
    assert not gemm.supports(QT.Q4_K, 40, 512) and not gemm.supports(QT.Q8_0, 32, 224)
    assert not gemm.supports(QT.Q5_K, 32, 512)


def test_parallel_quantizers_give_q8k_py_bits():
    from hybrid_runtime.quant import gemm
    from hybrid_runtime.quant.q8k import quantize_q8_0, quantize_q8_k

    rng = np.random.default_rng()
    x = (rng.standard_normal((int(rng.integers(1, 30)), 512)) * rng.uniform(0.01, 10)).astype(np.float32)
    x[0, :256] = 0  # an all-zero block
    qs, bs, d = gemm.quantize_acts(QT.Q4_K, x)
    for a, b in zip((qs, d, bs), quantize_q8_k(x)):
        assert np.array_equal(a, b)
    qs, sums, d = gemm.quantize_acts(QT.Q8_0, x)
    for a, b in zip((qs, d, sums), quantize_q8_0(x)):
        assert np.array_equal(a, b)


def test_silu_mul_acts_matches_numpy():
    from hybrid_runtime.experts.moe_cpu import _silu_mul
    from hybrid_runtime.quant import gemm

    rng = np.random.default_rng()
    gu = (rng.standard_normal((7, 1024)) * 4).astype(np.float32)
    qs, bs, d = gemm.SiluActs(7, 512)(gu)
    h = _silu_mul(gu[:, :512], gu[:, 512:])
    ref = gemm.quantize_acts(QT.Q4_K, h)
    assert np.mean(qs == ref[0]) > 0.999 and np.allclose(d, ref[2], rtol=1e-6)
