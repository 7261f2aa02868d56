"""moe_forward against a float64 reference built from dequantized experts (fresh random inputs)."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from hybrid_runtime.errors import HybridError
from hybrid_runtime.experts.moe_cpu import ExpertWeights, moe_forward
from hybrid_runtime.quant.q8k import dequantize_q8_k, quantize_q8_k

_F16_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q8_0: (0,)}


def random_raw(qtype: QT, shape: tuple[int, ...], rng) -> np.ndarray:
    """Weights [E, R, C] as GGUF stores them: raw blocks (uint8), or float16/float32 arrays."""
    if qtype in (QT.F32, QT.F16):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32 if qtype == QT.F32 else np.float16)
    if qtype not in _F16_FIELDS:  # a type gguf-py can quantize (Q4_0, Q5_0, ...)
        return quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype)
    values, nbytes = GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    raw = rng.integers(0, 256, size=(*lead, cols // values, nbytes), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-2, size=raw.shape[:-1]).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(*scale.shape, 2)
    return raw.reshape(*lead, -1)


def make_experts(rng, n_expert=6, n_ff=512, hidden=512, types=(QT.Q4_K, QT.Q4_K, QT.Q6_K)) -> ExpertWeights:
    gate = random_raw(types[0], (n_expert, n_ff, hidden), rng)
    up = random_raw(types[1], (n_expert, n_ff, hidden), rng)
    down = random_raw(types[2], (n_expert, hidden, n_ff), rng)
    return ExpertWeights(gate, up, down, *types, n_expert=n_expert, n_ff=n_ff, hidden=hidden)


def dense(w, qtype):  # [E, R, C] float64
    if w.dtype != np.uint8:
        return w.astype(np.float64)
    return dequantize(w, qtype).astype(np.float64)


def reference(x, ids, weights, ex: ExpertWeights, quantize_acts: bool):
    wg, wu, wd = dense(ex.gate, ex.gate_type), dense(ex.up, ex.up_type), dense(ex.down, ex.down_type)
    q = (lambda v: dequantize_q8_k(*quantize_q8_k(v.astype(np.float32)[None])[:2])[0].astype(np.float64)) \
        if quantize_acts else (lambda v: v)
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        xt = q(x[t].astype(np.float64))
        for e, wt in zip(ids[t], weights[t]):
            g, u = wg[e] @ xt, wu[e] @ xt
            h = g / (1 + np.exp(-g)) * u
            out[t] += wt * (wd[e] @ q(h))
    return out


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def routing(rng, n_tok, n_expert, k):
    ids = np.stack([rng.choice(n_expert, size=k, replace=False) for _ in range(n_tok)]).astype(np.int32)
    return ids, rng.uniform(0.1, 1.0, size=(n_tok, k)).astype(np.float32)


@pytest.mark.parametrize("n_tok", [1, 2, 5])
@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q4_K, QT.Q8_0),
                                   (QT.Q2_K, QT.Q3_K, QT.Q4_K)])
def test_moe_forward_matches_float64_reference(n_tok, types):
    rng = np.random.default_rng()
    ex = make_experts(rng, types=types)
    x = rng.standard_normal((n_tok, ex.hidden)).astype(np.float32)
    ids, w = routing(rng, n_tok, ex.n_expert, 3)
    y = moe_forward(x, ids, w, ex)
    assert y.shape == (n_tok, ex.hidden) and y.dtype == np.float32
    tol_q = 2e-2 if types[2] == QT.Q8_0 else 2e-3  # down activations: Q8_0 there, Q8_K in the reference
    assert rel_l2(y, reference(x, ids, w, ex, quantize_acts=True)) < tol_q
    assert rel_l2(y, reference(x, ids, w, ex, quantize_acts=False)) < 5e-2


@pytest.mark.parametrize("types", [(QT.F16, QT.F32, QT.F16), (QT.Q4_0, QT.Q5_0, QT.Q8_0)])
def test_types_without_kernel_use_the_dequantize_path(types):
    rng = np.random.default_rng()
    ex = make_experts(rng, n_ff=256, hidden=256, types=types)
    x = rng.standard_normal((2, ex.hidden)).astype(np.float32)
    ids, w = routing(rng, 2, ex.n_expert, 2)
    assert rel_l2(moe_forward(x, ids, w, ex), reference(x, ids, w, ex, quantize_acts=False)) < 3e-2


@pytest.mark.parametrize("portable", [False, True])
def test_ff_range_partial_sums_equal_the_whole(portable, monkeypatch):
    if portable:
        monkeypatch.setenv("HYBRID_RUNTIME_NO_VNNI", "1")
    rng = np.random.default_rng()
    ex = make_experts(rng, n_ff=768)
    x = rng.standard_normal((3, ex.hidden)).astype(np.float32)
    ids, w = routing(rng, 3, ex.n_expert, 4)
    whole = moe_forward(x, ids, w, ex)
    parts = moe_forward(x, ids, w, ex, ff_range=(0, 256))
    moe_forward(x, ids, w, ex, ff_range=(256, 768), out=parts)
    assert rel_l2(parts, whole.astype(np.float64)) < 1e-5
    assert rel_l2(whole, reference(x, ids, w, ex, quantize_acts=True)) < 2e-3


def test_shared_expert_across_tokens_and_bad_range():
    rng = np.random.default_rng()
    ex = make_experts(rng, n_expert=3)
    x = rng.standard_normal((4, ex.hidden)).astype(np.float32)
    ids = np.array([[0, 1], [1, 0], [2, 1], [1, 2]], np.int64)
    w = rng.uniform(size=(4, 2)).astype(np.float32)
    assert rel_l2(moe_forward(x, ids, w, ex), reference(x, ids, w, ex, quantize_acts=True)) < 2e-3
    with pytest.raises(HybridError):
        moe_forward(x, ids, w, ex, ff_range=(100, 300))
    with pytest.raises(HybridError):
        moe_forward(x, ids + 1, w, ex)  # expert 3 of 3


def test_prefill_forward_matches_moe_forward():
    from hybrid_runtime.experts.prefill import prefill_forward

    rng = np.random.default_rng()
    ex = make_experts(rng, n_expert=4, n_ff=512, hidden=256)
    x = rng.standard_normal((9, ex.hidden)).astype(np.float32)
    ids, w = routing(rng, 9, ex.n_expert, 2)
    ids[:, 0], ids[:, 1] = 0, rng.integers(1, ex.n_expert, size=9)  # expert 0: 9 tokens, the rest fewer
    ref = reference(x, ids, w, ex, quantize_acts=False)
    mixed = prefill_forward(x, ids, w, ex, torch_min_tokens=5)  # some groups torch, some kernels
    all_torch = prefill_forward(x, ids, w, ex, torch_min_tokens=1, ff_range=(256, 512))
    prefill_forward(x, ids, w, ex, torch_min_tokens=1, ff_range=(0, 256), out=all_torch)
    assert rel_l2(mixed, ref) < 5e-2
    assert rel_l2(all_torch, ref) < 3e-2  # bf16 weights and activations


@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q6_K, QT.Q4_K, QT.Q4_K), (QT.Q4_K, QT.Q4_K, QT.Q8_0)])
def test_prefill_int8_matches_moe_forward(types):
    """The panel GEMM path against the row kernels on the same Q8_K activations (types without the
    GEMM, Q8_0 here, fall back to bf16 groups). The float summation order differs, so silu(gate)*up
    can differ in its last bit and its Q8_K rounding then flips a quantum now and then: usually the
    two agree to ~2e-7, a flip costs ~1e-4 (seen once in CI), hence the bound; the kernels' own bound
    against the float64 reference in this file (2e-3) holds for this path too."""
    from hybrid_runtime.experts.prefill import prefill_forward
    from hybrid_runtime.quant.cpu_features import has_avx512_vnni

    if not has_avx512_vnni():
        pytest.skip("the panel GEMM needs AVX-512 VNNI")
    rng = np.random.default_rng()
    ex = make_experts(rng, n_expert=5, n_ff=512, hidden=256, types=types)
    T = int(rng.integers(20, 40))
    x = rng.standard_normal((T, ex.hidden)).astype(np.float32)
    ids, w = routing(rng, T, ex.n_expert, 2)
    ids[:, 0] = 0  # expert 0: every token; the others fewer, some below the GEMM threshold
    ids[:, 1] = rng.integers(1, ex.n_expert, size=T)
    kernels = moe_forward(x, ids, w, ex)
    int8 = prefill_forward(x, ids, w, ex, int8=True, int8_min_tokens=6)
    limit = 1e-3 if QT.Q8_0 not in types else 3e-2
    assert rel_l2(int8, kernels) < limit
    assert rel_l2(int8, reference(x, ids, w, ex, quantize_acts=True)) < (2e-3 if limit < 1e-2 else 5e-2)


def test_configure_threads_sets_both_pools():
    import numba
    import torch

    from hybrid_runtime.experts.prefill import configure_threads

    before = (numba.get_num_threads(), torch.get_num_threads())
    try:
        configure_threads(1)
        assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
    finally:
        numba.set_num_threads(before[0])
        torch.set_num_threads(before[1])


def test_zero_weight_pairs_are_skipped_and_change_nothing():
    """Pairs of weight 0 (the GPU-cached experts of the hybrid path) are dropped before the kernels."""
    from gguf import GGMLQuantizationType as QT

    from hybrid_runtime.bench.kernels import random_weights
    from hybrid_runtime.experts.moe_cpu import ExpertWeights, group_by_expert, moe_forward

    rng = np.random.default_rng()
    E, D, F, T, K = 6, 256, 256, 5, 3
    ex = ExpertWeights(random_weights(QT.Q4_K, (E, F, D), rng), random_weights(QT.Q4_K, (E, F, D), rng),
                       random_weights(QT.Q6_K, (E, D, F), rng), QT.Q4_K, QT.Q4_K, QT.Q6_K, E, F, D)
    x = rng.normal(size=(T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    w = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
    w0 = w.copy()
    w0[rng.random((T, K)) < 0.5] = 0.0
    assert len(group_by_expert(ids, w0, E).pair_token) == int((w0 != 0).sum())
    full = moe_forward(x, ids, w0, ex)
    # the same result as computing every pair with the zeroed weights in float64
    ref = np.zeros((T, D))
    for t in range(T):
        for k in range(K):
            if w0[t, k]:
                ref[t] += w0[t, k] * moe_forward(x[t:t + 1], ids[t:t + 1, k:k + 1], np.ones((1, 1), np.float32), ex)[0]
    np.testing.assert_allclose(full, ref, rtol=1e-4, atol=1e-5)
    assert not moe_forward(x, ids, np.zeros_like(w), ex).any()
