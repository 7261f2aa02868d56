"""Stored panels (quant/gemm.build_stored, quant/panels.py): the compact records the loader keeps
instead of the raw blocks give bit for bit the results of the work panels repacked from the raw
blocks, match float64 products of gguf's dequantization, cost the raw blocks' bytes (Q4_K +3 %),
and serve the compiled step: its matrices are read from them (batched decode with panels:
test_cpu_step.py)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import hybrid_runtime as hr
from hybrid_runtime.quant.cpu_features import has_avx512_vnni
from hybrid_runtime.quant.q8k import dequantize_q8_0, dequantize_q8_k

from test_quant_kernels import random_blocks, rel_l2

pytestmark = pytest.mark.skipif(not has_avx512_vnni(), reason="the panel kernels need AVX-512 VNNI")
TYPES = [QT.Q4_K, QT.Q6_K, QT.Q8_0]


def _shape(rng):
    return 16 * int(rng.integers(1, 7)), 256 * int(rng.integers(1, 5))


def _both(qtype, raw, x, tok):
    """(stored panels' result, the work panels' result) for the tokens tok of x."""
    from hybrid_runtime.quant import gemm

    acts = gemm.quantize_acts(qtype, x)
    rows, cols = raw.shape[0], x.shape[1]
    pad = 2  # the kernels write only their own columns
    ys = np.full((len(tok), rows + 2 * pad), np.nan, np.float32)
    gemm.matmul_stored(gemm.build_stored(raw, qtype), 0, acts, np.asarray(tok), ys, pad)
    assert np.isnan(ys[:, :pad]).all() and np.isnan(ys[:, pad + rows:]).all()
    yw = np.empty((len(tok), rows), np.float32)
    gemm.matmul(qtype, raw.reshape(-1), 0, raw.shape[1], rows, cols, acts, np.asarray(tok), yw)
    return ys[:, pad: pad + rows], yw, acts


@pytest.mark.parametrize("qtype", TYPES)
def test_stored_equal_the_work_panels_and_float64(qtype):
    rng = np.random.default_rng()
    rows, cols = _shape(rng)
    raw = random_blocks(qtype, rows, cols, rng)
    for n_tok in (1, 3, int(rng.integers(5, 40))):  # one tile; the Q6_K expansion beyond one
        x = rng.standard_normal((n_tok + 2, cols)).astype(np.float32)
        tok = rng.integers(0, n_tok + 2, n_tok)
        stored, work, acts = _both(qtype, raw, x, tok)
        assert np.array_equal(stored, work)
        xq = dequantize_q8_0(acts[0], acts[2]) if qtype == QT.Q8_0 else dequantize_q8_k(acts[0], acts[2])
        exact = xq.astype(np.float64)[tok] @ dequantize(raw, qtype).astype(np.float64).T
        assert rel_l2(stored, exact) < 2e-6


@pytest.mark.parametrize("qtype", TYPES)
def test_a_tokens_result_does_not_depend_on_the_others(qtype):
    from hybrid_runtime.quant import gemm

    rng = np.random.default_rng()
    rows, cols = 32, 512
    sp = gemm.build_stored(random_blocks(qtype, rows, cols, rng), qtype)
    x = rng.standard_normal((19, cols)).astype(np.float32)
    acts = gemm.quantize_acts(qtype, x)

    def run(tok):
        y = np.empty((len(tok), rows), np.float32)
        return gemm.matmul_stored(sp, 0, acts, np.asarray(tok), y)

    alone = np.concatenate([run([t]) for t in range(19)])
    assert np.array_equal(run(np.arange(19)), alone)
    order = rng.permutation(19)
    assert np.array_equal(run(order), alone[order])


@pytest.mark.parametrize("qtype", TYPES)
def test_a_stack_of_experts_is_each_expert_stored_alone(qtype):
    from hybrid_runtime.quant import gemm

    rng = np.random.default_rng()
    E, rows, cols = 3, 32, 256 * int(rng.integers(1, 4))
    raw = np.stack([random_blocks(qtype, rows, cols, rng) for _ in range(E)])
    stack = gemm.build_stored(raw, qtype)
    assert stack.n_expert == E and stack.nbytes == gemm.stored_bytes(qtype, raw.shape)
    for e in range(E):
        one = gemm.build_stored(raw[e], qtype)
        assert np.array_equal(stack.data[e * stack.estride: (e + 1) * stack.estride], one.data)


def test_stored_panels_cost_the_raw_bytes():
    """Q6_K and Q8_0 panels are exactly as large as their blocks, Q4_K's 2368 / 2304 of them."""
    from hybrid_runtime.quant import gemm

    rng = np.random.default_rng()
    for qtype, ratio in ((QT.Q4_K, 2368 / 2304), (QT.Q6_K, 1.0), (QT.Q8_0, 1.0)):
        raw = random_blocks(qtype, 64, 1024, rng)
        assert gemm.build_stored(raw, qtype).nbytes == pytest.approx(raw.nbytes * ratio)
    assert not gemm.stored_supported(QT.Q4_K, (24, 1152))  # not whole panels of 16 rows
    assert not gemm.stored_supported(QT.Q8_0, (16, 136))   # not whole records of 256 values
    assert not gemm.stored_supported(QT.Q2_K, (16, 84))


def test_the_store_replaces_the_raw_blocks_with_panels(tiny):
    """expert_store="panels": the step's panel-able matrices are addressed inside the panels (not
    the file), of the panels' kind; the per-head attn_k_b / attn_v_b stay raw blocks in the store
    (the step reads its own panel copy of them)."""
    from hybrid_runtime.cpu import table as tb

    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    model = hr.load(path, threads=2, expert_store="panels")
    net, gf = model.net, model.file
    assert model.file.store_report.mode == "panels" and gf.panels
    base = net.w.space.__array_interface__["data"][0]
    lt = net.w.layers[1]
    for field, name in ((tb.F_GATE_X, "ffn_gate_exps"), (tb.F_UP_X, "ffn_up_exps"), (tb.F_DOWN_X, "ffn_down_exps"),
                        (tb.F_O, "attn_output")):
        sp = gf.panels[f"blk.1.{name}.weight"]
        m = net.w.mats[lt[field]]
        assert m[tb.M_KIND] == sp.fmt >= tb.P_Q4_K
        assert m[tb.M_OFF] == sp.data.__array_interface__["data"][0] - base
    # the per-head attn_k_b / attn_v_b stay raw blocks for the torch prefill; the step keeps its own
    # small panel copy of them (k_b's 128 columns zero-padded to a whole record)
    assert "blk.1.attn_k_b.weight" not in gf.panels and "blk.1.attn_v_b.weight" not in gf.panels
    for field in (tb.F_K_B, tb.F_V_B):
        assert net.w.mats[lt[field], tb.M_KIND] == tb.P_Q8_0


def test_panels_and_raw_blocks_give_the_same_model(tiny):
    """The same file with panels and with the raw blocks (row kernels): the integer sums are the
    same, the float order per row differs, so logits agree to rounding noise (amplified on a random
    network), and prefill and decode still agree bit for bit with panels."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    panels = hr.load(path, threads=2, expert_store="panels", prefill_chunk=64)
    raw = hr.load(path, threads=2, expert_store="hugepages", prefill_chunk=64)
    toks = np.random.default_rng().integers(0, panels.config.n_vocab, 20).tolist()
    a, b = panels.logits(toks), raw.logits(toks)
    assert rel_l2(a, b.astype(np.float64)) < 3e-2
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    cache = panels.new_cache()
    steps = np.concatenate([panels.forward([t], cache) for t in toks])
    assert np.array_equal(a, steps)
