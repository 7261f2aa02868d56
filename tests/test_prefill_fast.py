"""The fast prefill pieces against independent references: bf16 dequantization (gguf's
dequantizer, then torch's own float32 -> bf16 rounding), the pair combine (numpy), the
vectorizable exp of the compiled attention core (numpy's exp), and the causal query blocks of
the torch model's attention (one unblocked pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

from hybrid_runtime.quant.bf16 import as_bf16, dequantize_bf16

# where each block keeps its fp16 scales (byte offsets), so random bytes stay finite
_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q8_0: (0,), QT.Q3_K: (108,), QT.Q2_K: (80, 82)}


def _random_blocks(rng, qtype: QT, rows: int, cols: int) -> np.ndarray:
    values, nbytes = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in _SCALES[qtype]:
        d = rng.uniform(-0.05, 0.05, (rows, cols // values)).astype(np.float16)
        w[:, :, off: off + 2] = d.view(np.uint8).reshape(rows, cols // values, 2)
    return w.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q3_K])
def test_bf16_dequantization_equals_gguf_then_torch_rounding(qtype):
    rng = np.random.default_rng()
    rows, cols = int(rng.integers(3, 40)), 256 * int(rng.integers(1, 5))
    w = _random_blocks(rng, qtype, rows, cols)
    ref = torch.from_numpy(dequantize(w, qtype).astype(np.float32)).to(torch.bfloat16)
    out = dequantize_bf16(qtype, w, np.empty((rows, cols), np.uint16))
    assert torch.equal(as_bf16(out), ref)


def test_bf16_of_float_rows_rounds_to_nearest_even():
    rng = np.random.default_rng()
    x = (rng.standard_normal((17, 300)) * 10.0 ** rng.uniform(-30, 30, (17, 1))).astype(np.float32)
    out = dequantize_bf16(QT.F32, x, np.empty(x.shape, np.uint16))
    assert torch.equal(as_bf16(out), torch.from_numpy(x).to(torch.bfloat16))


def test_pair_combine_matches_numpy():
    from hybrid_runtime.experts.moe_cpu import group_by_expert, scatter_pairs

    rng = np.random.default_rng()
    T, K, E, D = int(rng.integers(1, 60)), 4, 9, 33
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)])
    w = rng.random((T, K)).astype(np.float32)
    w[rng.random((T, K)) < 0.2] = 0.0  # dropped pairs
    route = group_by_expert(ids, w, E)
    y = rng.standard_normal((len(route.pair_token), D)).astype(np.float32)
    ref = np.zeros((T, D), np.float64)
    for p, slot in enumerate(route.pair_slot):
        ref[slot // K] += np.float64(route.pair_weight[p]) * y[p]
    got = scatter_pairs(None, T, route, y)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    base = rng.standard_normal((T, D)).astype(np.float32)
    np.testing.assert_allclose(scatter_pairs(base.copy(), T, route, y), base + ref, rtol=1e-5, atol=1e-5)

    # mixed sources: a random subset of the pairs as bf16 rows (exact in float32), the rest float32
    P = len(route.pair_token)
    in16 = rng.random(P) < 0.5
    y_bf = torch.from_numpy(y).to(torch.bfloat16).float().numpy()
    y16 = y_bf.view(np.uint32) >> 16
    row32 = np.full(P, -1, np.int64)
    row32[~in16] = np.arange(int((~in16).sum()))
    y_mix = np.where(in16[:, None], y_bf, y)
    ref_mix = np.zeros((T, D), np.float64)
    for p, slot in enumerate(route.pair_slot):
        ref_mix[slot // K] += np.float64(route.pair_weight[p]) * y_mix[p]
    got = scatter_pairs(None, T, route, y[~in16], y16.astype(np.uint16), row32)
    np.testing.assert_allclose(got, ref_mix, rtol=1e-5, atol=1e-6)


def test_vectorizable_exp_matches_numpy():
    import numba

    from hybrid_runtime.cpu.layers import exp_neg

    @numba.njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_neg(x[i])

    x = -np.random.default_rng().uniform(0, 90, 20000).astype(np.float32)
    x[:3] = (0.0, -1e-8, -87.5)
    out = np.empty_like(x)
    run(x, out)
    ref = np.exp(x.astype(np.float64))
    normal = ref > 1e-37
    assert np.max(np.abs(out[normal] - ref[normal]) / ref[normal]) < 5e-7
    assert np.all(out[~normal] < 1e-36)


def test_causal_query_blocks_equal_one_pass(tiny, monkeypatch):
    """The torch model's attention in query blocks (each sees only its causal prefix) against
    the same model with one block over the whole chunk."""
    import hybrid_runtime as hr
    from hybrid_runtime.models import deepseek2

    path, _ = tiny("kimi-k2-tiny", "Q8_0")
    model = hr.load(path, compiled=False)
    toks = np.random.default_rng().integers(0, model.n_vocab, 300).tolist()
    monkeypatch.setattr(deepseek2, "QUERY_BLOCK", 64)
    blocked = model.logits(toks)
    monkeypatch.setattr(deepseek2, "QUERY_BLOCK", 1 << 20)
    whole = model.logits(toks)
    assert np.linalg.norm(blocked - whole) / np.linalg.norm(whole) < 1e-5


def test_bf16_linear_matches_float64_reference():
    """KernelLinear's bf16 prefill path against float64 on the same bf16-rounded operands."""
    from hybrid_runtime.weights.provider import KernelLinear

    rng = np.random.default_rng()
    w = _random_blocks(rng, QT.Q8_0, 96, 512)
    x = torch.from_numpy(rng.standard_normal((130, 512)).astype(np.float32))
    got = KernelLinear(w, QT.Q8_0, bf16_prefill=True)(x)
    wf = torch.from_numpy(dequantize(w, QT.Q8_0).astype(np.float32)).to(torch.bfloat16).double()
    ref = x.to(torch.bfloat16).double() @ wf.T
    assert torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref) < 1e-2  # the bf16 output rounding
    exact = KernelLinear(w, QT.Q8_0)(x)
    assert not torch.equal(got, exact)


def test_int8_linear_matches_the_row_kernels():
    """KernelLinear's int8 prefill path (the panel GEMM) against the row kernels on the same
    quantized activations: only the float summation order differs."""
    from hybrid_runtime.quant import kernels
    from hybrid_runtime.quant.cpu_features import has_avx512_vnni
    from hybrid_runtime.weights.provider import KernelLinear

    if not has_avx512_vnni():
        pytest.skip("the panel GEMM needs AVX-512 VNNI")
    rng = np.random.default_rng()
    for qtype in (QT.Q8_0, QT.Q4_K, QT.Q6_K):
        w = _random_blocks(rng, qtype, 64, 512)
        x = rng.standard_normal((int(rng.integers(100, 200)), 512)).astype(np.float32)
        got = KernelLinear(w, qtype, int8_prefill=True)(torch.from_numpy(x)).double()
        want = torch.from_numpy(kernels.matmul(qtype, w, x)).double()
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-6


def test_prefill_precision_option(tiny):
    import hybrid_runtime as hr
    from hybrid_runtime.errors import InvalidRequestError

    path, _ = tiny("kimi-k2-tiny", "Q8_0")
    with pytest.raises(InvalidRequestError, match="prefill_precision"):
        hr.load(path, prefill_precision="fp8")
    exact_model = hr.load(path, prefill_precision="exact")
    toks = np.random.default_rng().integers(0, exact_model.n_vocab, 200).tolist()
    exact = exact_model.logits(toks)
    default = hr.load(path).logits(toks)
    assert np.array_equal(default, hr.load(path, prefill_precision="int8").logits(toks))  # the default
    for fast in (default, hr.load(path, prefill_precision="bf16").logits(toks)):
        err = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
        assert 0 < err < 0.1


def test_decompressed_attention_matches_the_absorbed_form(tiny, monkeypatch):
    """A long bf16 chunk attends in the decompressed form (per-head k and v from the latents);
    against the absorbed form on the same prompt, and both against the float32 exact prefill."""
    import hybrid_runtime as hr
    from hybrid_runtime.models import deepseek2

    path, _ = tiny("kimi-k2-tiny", "Q8_0")
    model = hr.load(path, prefill_precision="bf16")
    assert hasattr(model.net.prefill_net.attn[0].wk_b, "dense_weight")  # the case under test
    toks = np.random.default_rng().integers(0, model.n_vocab, 300).tolist()
    decompressed = model.logits(toks)
    monkeypatch.setattr(deepseek2, "DECOMPRESS_MIN_TOKENS", 1 << 30)
    absorbed = model.logits(toks)
    exact = hr.load(path, prefill_precision="exact").logits(toks)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    print(f"decompressed vs absorbed {rel(decompressed, absorbed):.2e}; vs exact: decompressed "
          f"{rel(decompressed, exact):.2e}, absorbed {rel(absorbed, exact):.2e}")
    assert not np.array_equal(decompressed, absorbed)
    assert rel(decompressed, absorbed) < 3e-2
    assert rel(decompressed, exact) < 1.5 * rel(absorbed, exact) + 1e-3
