"""CPU quant kernels against gguf.quants.dequantize and float64 products (fresh random inputs)."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

from hybrid_runtime.quant import kernels
from hybrid_runtime.quant.cpu_features import has_avx512_vnni
from hybrid_runtime.quant.q8k import dequantize_q8_0, dequantize_q8_k, quantize_q8_0, quantize_q8_k

# byte offsets of the fp16 scale fields inside one block
_F16_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q8_0: (0,)}
TYPES = list(_F16_FIELDS)


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid raw blocks uint8 [rows, row_bytes]: random bits, small positive fp16 scales."""
    values, nbytes = GGML_QUANT_SIZES[qtype]
    nb = cols // values
    raw = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 2e-2, size=(rows, nb)).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * nbytes)


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _dequant_acts(qtype, x):
    if qtype == QT.Q8_0:
        qs, d, _ = quantize_q8_0(x)
        return dequantize_q8_0(qs, d)
    qs, d, _ = quantize_q8_k(x)
    return dequantize_q8_k(qs, d)


def _modes():
    return [True, False] if has_avx512_vnni() else [True]


@pytest.mark.parametrize("portable", _modes())
@pytest.mark.parametrize("qtype", TYPES)
def test_matmul_matches_dequantized_reference(qtype, portable):
    rng = np.random.default_rng()
    rows, cols = int(rng.integers(17, 65)) | 1, 256 * int(rng.integers(1, 4))
    n_tok = int(rng.integers(1, 5))
    raw = random_blocks(qtype, rows, cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    w64 = dequantize(raw, qtype).astype(np.float64)  # [rows, cols]
    y = kernels.matmul(qtype, raw, x, portable=portable)  # [T, rows]
    exact = _dequant_acts(qtype, x).astype(np.float64) @ w64.T
    assert y.shape == (n_tok, rows)
    assert rel_l2(y, exact) < 2e-5
    assert rel_l2(y, x.astype(np.float64) @ w64.T) < 5e-2  # Q8_K rounding of x


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0])
def test_strided_row_views(qtype):
    """A column slice of the raw bytes (how ff_range slices the down projection) still works."""
    rng = np.random.default_rng()
    values, nbytes = GGML_QUANT_SIZES[qtype]
    rows, cols = 17, 1024
    raw = random_blocks(qtype, rows, cols, rng)
    part = raw[:, nbytes * (256 // values): nbytes * (768 // values)]  # columns 256:768
    x = rng.standard_normal((2, 512)).astype(np.float32)
    y = kernels.matmul(qtype, part, x)
    w64 = dequantize(raw, qtype).astype(np.float64)[:, 256:768]
    assert rel_l2(y, _dequant_acts(qtype, x).astype(np.float64) @ w64.T) < 2e-5


def test_registry_covers_the_expected_types():
    assert set(kernels.CPU_KERNELS) == set(TYPES)
    for qtype, spec in kernels.CPU_KERNELS.items():
        assert (spec.block_values, spec.block_bytes) == GGML_QUANT_SIZES[qtype]


def test_activation_kind_mismatch_is_rejected():
    rng = np.random.default_rng()
    raw = random_blocks(QT.Q4_K, 4, 256, rng)
    acts = kernels.quantize_acts("q8_0", rng.standard_normal((1, 256)).astype(np.float32))
    out = np.empty((1, 4), np.float32)
    with pytest.raises(ValueError):
        kernels.grouped_matmul(kernels.CPU_KERNELS[QT.Q4_K], raw[None], np.zeros(1), np.array([0, 1]),
                               np.zeros(1), acts, out)


def _q8k_numpy(x: np.ndarray):
    """numpy rendition of ggml quantize_row_q8_K_ref (float32 arithmetic, as in C)."""
    blocks = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(blocks).argmax(axis=2)
    vmax = np.take_along_axis(blocks, idx[..., None], axis=2)  # [T, nb, 1] signed
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint((iscale * blocks).astype(np.float32)), 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(iscale != 0, np.float32(1.0) / iscale, 0).astype(np.float32)[..., 0]
    bsums = q.reshape(x.shape[0], -1, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return q.reshape(x.shape), d, bsums


def test_quantize_q8_k_matches_numpy_rendition():
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 1024)) * rng.uniform(0.1, 10)).astype(np.float32)
    x[1, 256:512] = 0.0  # an all-zero block
    qs, d, bsums = quantize_q8_k(x)
    q_ref, d_ref, b_ref = _q8k_numpy(x)
    np.testing.assert_array_equal(qs, q_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(bsums, b_ref)
    err = np.abs(dequantize_q8_k(qs, d).astype(np.float64) - x)
    assert np.all(err <= np.repeat(np.abs(d), 256, axis=1) * 0.5001 + 1e-30)


def test_quantize_q8_0_rounds_like_ggml():
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[0, :32] = 0.0
    qs, d, sums = quantize_q8_0(x)
    blocks = x.reshape(2, -1, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, 0).astype(np.float32)
    q_ref = np.rint((blocks * inv).astype(np.float32)).astype(np.int8).reshape(x.shape)
    np.testing.assert_array_equal(qs, q_ref)
    np.testing.assert_array_equal(d, (amax[..., 0] / np.float32(127)).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(sums, q_ref.reshape(2, -1, 32).astype(np.int32).sum(axis=2))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_rows_matches_gguf(qtype):
    rng = np.random.default_rng()
    raw = random_blocks(qtype, 9, 512, rng)
    ref = dequantize(raw, qtype)
    got = kernels.dequantize_rows(qtype, raw[:, : raw.shape[1]])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


def test_env_switch_forces_the_portable_kernels(monkeypatch):
    from hybrid_runtime.quant import cpu_features

    monkeypatch.setenv("HYBRID_RUNTIME_NO_VNNI", "1")
    assert not cpu_features.has_avx512_vnni()
    assert cpu_features.describe()["vnni_kernels"] is False
    rng = np.random.default_rng()
    raw = random_blocks(QT.Q4_K, 5, 256, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    exact = _dequant_acts(QT.Q4_K, x).astype(np.float64) @ dequantize(raw, QT.Q4_K).astype(np.float64).T
    assert rel_l2(kernels.matmul(QT.Q4_K, raw, x), exact) < 2e-5


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 5, 6, 7, 9, 14])
def test_every_block_count_q8_0(n_blocks):
    """Q8_0 rows go four blocks at a time, then a pair, then a single block: every remainder."""
    rng = np.random.default_rng()
    raw = random_blocks(QT.Q8_0, 7, 32 * n_blocks, rng)
    x = rng.standard_normal((3, 32 * n_blocks)).astype(np.float32)
    exact = _dequant_acts(QT.Q8_0, x).astype(np.float64) @ dequantize(raw, QT.Q8_0).astype(np.float64).T
    assert rel_l2(kernels.matmul(QT.Q8_0, raw, x), exact) < 2e-5


_PREFETCH_PROBE = """
import sys, numpy as np
from gguf import GGMLQuantizationType as QT
from hybrid_runtime.quant import kernels, vnni
raw = np.load(sys.argv[1]); x = np.load(sys.argv[2])
print(vnni.PREFETCH_BYTES)
np.save(sys.argv[3], kernels.matmul(QT[sys.argv[4]], raw, x))
"""


@pytest.mark.skipif(not has_avx512_vnni(), reason="the prefetches are in the VNNI row kernels")
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0])
def test_prefetching_row_kernels_give_the_same_bits(qtype, tmp_path):
    """The row kernels built with and without prefetches (a compile-time choice per CPU vendor,
    HYBRID_RUNTIME_PREFETCH_BYTES overrides it; its own Numba cache) compute the same bits."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng()
    raw = random_blocks(qtype, int(rng.integers(40, 200)), 256 * int(rng.integers(2, 9)), rng)
    x = rng.standard_normal((int(rng.integers(1, 4)), raw.shape[1] // GGML_QUANT_SIZES[qtype][1]
                             * GGML_QUANT_SIZES[qtype][0])).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "x.npy", x)
    outs = []
    for ahead in ("0", "1024"):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env["HYBRID_RUNTIME_PREFETCH_BYTES"] = ahead
        out = tmp_path / f"y{ahead}.npy"
        res = subprocess.run([sys.executable, "-c", _PREFETCH_PROBE, str(tmp_path / "raw.npy"), str(tmp_path / "x.npy"),
                              str(out), qtype.name], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-1] == ahead
        outs.append(np.load(out))
    exact = _dequant_acts(qtype, x).astype(np.float64) @ dequantize(raw, qtype).astype(np.float64).T
    assert np.array_equal(outs[0], outs[1])
    assert rel_l2(outs[0], exact) < 2e-5


@pytest.mark.skipif(not has_avx512_vnni(), reason="the VNNI row kernels need AVX-512 VNNI")
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0])
def test_multi_row_dot_gives_each_rows_bits(qtype):
    """rows_dot (one weight row unpacked once for 2, 4 or 8 activation rows, as a batched step uses
    it) returns for every activation row exactly the bits of row_dot for that row alone, and both
    match the float64 product of gguf's dequantized weights."""
    import numba

    from hybrid_runtime.cpu import rows
    from hybrid_runtime.cpu.step import acts
    from hybrid_runtime.cpu.table import K_F32

    rng = np.random.default_rng()
    kind = kernels.CPU_KERNELS[qtype].kind
    for cols in ([512, 2048, 768] if qtype != QT.Q8_0 else [32 * 5, 32 * 6, 32 * 7, 2048, 32 * 3]):
        n_rows, n_act = 3, 15
        w = random_blocks(qtype, n_rows, cols, rng)
        x = rng.standard_normal((n_act, cols)).astype(np.float32)
        a = acts(n_act, cols)
        a.X[:, :cols] = x
        rows.quantize_rows(a.X, n_act, cols, rows.need_of(kind), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
        nb = cols // GGML_QUANT_SIZES[qtype][0]
        flat = np.ascontiguousarray(w).reshape(-1)
        rb = w.shape[1]
        order = rng.permutation(n_act)

        @numba.njit
        def both(flat, rb, nb, kind, a, order):
            one = np.zeros((n_rows, n_act), np.float32)
            multi = np.zeros((n_rows, n_act), np.float32)
            for r in range(n_rows):
                for i in range(n_act):
                    one[r, order[i]] = rows.row_dot(kind, nb, cols, flat, r * rb, a.X, a.kq, a.kn, a.kd, a.ks,
                                                    a.zq, a.zd, a.zs, order[i])
                y4 = rows.rows_dot(kind, nb, flat, r * rb, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs,
                                   (order[0], order[1], order[2], order[3]))
                y2 = rows.rows_dot(kind, nb, flat, r * rb, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs,
                                   (order[4], order[5]))
                multi[r, order[0]], multi[r, order[1]], multi[r, order[2]], multi[r, order[3]] = y4
                multi[r, order[4]], multi[r, order[5]] = y2
                y8 = rows.rows_dot(kind, nb, flat, r * rb, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs,
                                   (order[7], order[8], order[9], order[10], order[11], order[12], order[13], order[14]))
                for i in range(8):
                    multi[r, order[7 + i]] = y8[i]
                multi[r, order[6]] = rows.row_dot(kind, nb, cols, flat, r * rb, a.X, a.kq, a.kn, a.kd, a.ks,
                                                  a.zq, a.zd, a.zs, order[6])
            return one, multi

        one, multi = both(flat, rb, nb, kind, a, order)
        assert np.array_equal(one.view(np.int32), multi.view(np.int32)), (qtype.name, cols)
        ref = dequantize(w, qtype).astype(np.float64) @ x.astype(np.float64).T
        assert rel_l2(multi, ref) < 2e-2, (qtype.name, cols)
        assert kind != K_F32
