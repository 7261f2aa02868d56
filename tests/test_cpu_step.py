"""The compiled CPU step against the torch model (its definition) and against itself batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import hybrid_runtime as hr
from hybrid_runtime.cpu.step import CompiledDeepSeek2
from hybrid_runtime.cpu import table as tb
from hybrid_runtime.cpu.table import M_OFF, q8_0_from_32_blocks
from hybrid_runtime.layers import rms_norm
from hybrid_runtime.quant.cpu_features import has_avx512_vnni

pytestmark = pytest.mark.skipif(not has_avx512_vnni(), reason="the compiled step needs AVX-512 VNNI")

CASES = [("kimi-k2-tiny", "Q4_K_M"), ("deepseek-v3-tiny", "Q2_K"), ("kimi-k2-tiny", "Q8_0"), ("kimi-k2-tiny", "Q6_K")]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def loaded(tiny):
    models = {}

    def get(preset, quant):
        if (preset, quant) not in models:
            path, _ = tiny(preset, quant)
            compiled = hr.load(path, threads=2, prefill_chunk=64)
            torch_model = hr.load(path, threads=2, compiled=False)
            assert isinstance(compiled.net, CompiledDeepSeek2)
            assert not isinstance(torch_model.net, CompiledDeepSeek2)
            models[preset, quant] = compiled, torch_model
        return models[preset, quant]

    return get


@pytest.mark.parametrize("preset,quant", CASES)
def test_each_layer_equals_the_torch_model(loaded, preset, quant):
    """Same input to each layer's attention and FFN: the compiled layer matches the torch one
    (same activation rounding; float32 reordering noise, which now and then flips one Q8
    activation rounding: 1e-4 to 3e-3; a wrong index or scale shows as > 1e-1)."""
    compiled, ref = loaded(preset, quant)
    net, tnet, cfg = compiled.net, ref.net, compiled.config
    rng = np.random.default_rng()
    T = int(rng.integers(1, 9))
    toks = rng.integers(0, cfg.n_vocab, T)
    cache, tcache = net.new_cache(256), tnet.new_cache(256)
    cache.reserve(T)
    pos, btab = np.arange(T), np.tile(cache.table, (T, 1))
    xt = tnet.embed(torch.as_tensor(toks)).clone()
    L, eps = net._L, cfg.rms_eps
    for layer in range(cfg.n_layer):
        lt = net.w.layers[layer]
        x = xt.numpy().copy()
        L.attention(net.w, lt, net.dm, net.fd, x, T, pos, btab, net.pool.lat[layer], net.pool.pe[layer],
                    net.cos, net.sin, net.s, net.a, net.ah)
        with torch.inference_mode():
            xt_attn = xt + tnet.attn[layer](rms_norm(xt, tnet.attn_norm[layer], eps), torch.arange(T), tcache)
        assert _rel(x - xt.numpy(), (xt_attn - xt).numpy()) < 1e-2
        assert _rel(net.pool.lat[layer][:T], tcache._lat[layer][:T].numpy()) < 1e-2
        x = xt_attn.numpy().copy()
        (L.moe if lt[0] else L.dense_ffn)(net.w, lt, net.dm, net.fd, x, T, net.s, net.a)
        with torch.inference_mode():
            xt = xt_attn + tnet.ffn[layer](rms_norm(xt_attn, tnet.ffn_norm[layer], eps))
        assert _rel(x - xt_attn.numpy(), (xt - xt_attn).numpy()) < 1e-2


@pytest.mark.parametrize("preset,quant", CASES[:2])
def test_whole_model_agrees_with_the_torch_model(loaded, preset, quant):
    """On a random network rounding flips are amplified, so the whole model is judged loosely;
    the per-layer test above is the tight one and the llama.cpp oracle tests judge the rest."""
    compiled, ref = loaded(preset, quant)
    toks = np.random.default_rng().integers(0, compiled.config.n_vocab, 24).tolist()
    a, b = compiled.logits(toks), ref.logits(toks)
    assert _rel(a, b) < 0.05
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_prefill_equals_token_by_token(loaded):
    """A token's arithmetic does not depend on the tokens that share its call: a prompt run as one
    chunk and one token at a time gives bit-identical logits."""
    compiled, _ = loaded("kimi-k2-tiny", "Q4_K_M")
    toks = np.random.default_rng().integers(0, compiled.config.n_vocab, 20).tolist()
    whole = compiled.logits(toks)
    cache = compiled.new_cache()
    steps = np.concatenate([compiled.forward([t], cache) for t in toks])
    assert np.array_equal(whole, steps)


@pytest.mark.parametrize("preset,quant", [("deepseek-v3-tiny", "Q2_K"), ("kimi-k2-tiny", "Q4_K_M")])
def test_batched_decode_is_bit_identical_to_alone(loaded, preset, quant):
    """B sequences at different depths decoded in one step: each one's logits equal its own run
    (Q2_K: the row kernels on raw blocks; Q4_K_M: the stored panels, several tokens a tile)."""
    compiled, _ = loaded(preset, quant)
    net, rng = compiled.net, np.random.default_rng()
    B = 5
    prompts = [rng.integers(0, compiled.config.n_vocab, int(rng.integers(1, 40))).tolist() for _ in range(B)]
    nxt = rng.integers(0, compiled.config.n_vocab, B)
    alone, caches = [], []
    for p, t in zip(prompts, nxt):
        c = compiled.new_cache()
        compiled.forward(p, c)
        alone.append(compiled.forward([int(t)], c)[0])
        c2 = compiled.new_cache()
        compiled.forward(p, c2)
        caches.append(c2)
    batched = net.logits(net.forward_batch(nxt, caches)).numpy()
    assert np.array_equal(batched, np.stack(alone))


@pytest.mark.parametrize("preset,quant", [CASES[0], CASES[1]])
def test_chunks_by_cost_cover_every_row_once(loaded, preset, quant):
    """run_jobs cuts the jobs' rows into chunks of equal cost (rows x (2 + pairs)): experts with
    uneven numbers of tokens, any chunk count -> every output the same bits as one chunk, and the
    boundaries rise from 0 to all the rows, on whole panels inside stored-panel matrices."""
    from hybrid_runtime.cpu.layers import project
    from hybrid_runtime.cpu.rows import _boundary, _job_cost, is_panel, quantize_rows

    compiled, _ = loaded(preset, quant)
    net, rng = compiled.net, np.random.default_rng()
    w, s, a, mats = net.w, net.s, net.a, net.w.mats
    lt = w.layers[next(i for i in range(compiled.config.n_layer) if w.layers[i][tb.F_MOE])]
    gx, ux = lt[tb.F_GATE_X], lt[tb.F_UP_X]
    F, D = int(mats[gx, tb.M_ROWS]), compiled.config.n_embd
    P = min(a.X.shape[0], s.Yx.shape[0])
    a.X[:P, :D] = rng.standard_normal((P, D)).astype(np.float32)
    quantize_rows(a.X, P, D, 3, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
    cuts = np.sort(rng.choice(np.arange(1, P), size=min(3, P - 1), replace=False))
    spans = list(zip([0, *cuts], [*cuts, P]))  # 4 experts with different numbers of pairs
    jobs = np.zeros_like(s.jobs)
    for k, (p0, p1) in enumerate(spans):
        e = int(rng.integers(0, compiled.config.n_expert))
        jobs[2 * k], jobs[2 * k + 1] = (gx, e, p0, p1, 0), (ux, e, p0, p1, F)
    n_jobs = 2 * len(spans)
    act_row = np.arange(P, dtype=np.int64)
    ref = np.full((P, 2 * F), np.nan, np.float32)
    project(w, jobs, n_jobs, a, act_row, ref, 1, 0)  # one chunk: on the calling thread
    assert not np.isnan(ref).any()
    total = sum(_job_cost(mats, jobs, j) for j in range(n_jobs))
    rows = sum(int(mats[jobs[j, 0], tb.M_ROWS]) for j in range(n_jobs))
    for n_chunks in (2, 7, 8, 13):
        y = np.full_like(ref, np.nan)
        project(w, jobs, n_jobs, a, act_row, y, n_chunks, 0)  # serial_work 0: a parallel region
        assert np.array_equal(y, ref), n_chunks
        cut = [_boundary(mats, jobs, n_jobs, total * c // n_chunks) for c in range(n_chunks + 1)]
        assert cut[0] == 0 and cut[-1] == rows and all(x <= y_ for x, y_ in zip(cut, cut[1:]))
        if is_panel(mats[gx, tb.M_KIND]):
            assert all(c % 16 == 0 for c in cut)


@pytest.mark.parametrize("preset,quant", [CASES[0], CASES[1]])
def test_serial_and_parallel_steps_give_the_same_bits(loaded, preset, quant):
    """Small projections and attention cores run on the calling thread (below serial_work), the
    rest in parallel regions, the serial attention in wider head groups: a prompt and decode steps
    give bit-identical logits with everything serial, everything parallel and the default."""
    from hybrid_runtime.cpu.layers import D_SERIAL

    compiled, _ = loaded(preset, quant)
    net, rng = compiled.net, np.random.default_rng()
    toks = rng.integers(0, compiled.config.n_vocab, int(rng.integers(2, 30))).tolist()
    default = int(net.dm[D_SERIAL])
    runs = []
    try:
        for serial in (default, 0, 1 << 62):
            net.dm[D_SERIAL] = serial
            cache = compiled.new_cache()
            out = [compiled.forward(toks, cache)]
            out += [compiled.forward([t], cache) for t in toks[:4]]
            runs.append(np.concatenate(out))
    finally:
        net.dm[D_SERIAL] = default
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


def test_serial_work_comes_from_the_environment(monkeypatch):
    from hybrid_runtime.cpu.rows import SERIAL_WORK
    from hybrid_runtime.cpu.step import SERIAL_WORK_ENV, serial_work

    monkeypatch.delenv(SERIAL_WORK_ENV, raising=False)
    assert serial_work() in (SERIAL_WORK, 1 << 62)  # 1 << 62: one thread, everything serial
    monkeypatch.setenv(SERIAL_WORK_ENV, "12345")
    assert serial_work() in (12345, 1 << 62)
    monkeypatch.setenv(SERIAL_WORK_ENV, "lots")
    with pytest.raises(hr.HybridError, match="whole number"):
        serial_work()


def test_cache_blocks_return_to_the_pool(loaded):
    compiled, _ = loaded("kimi-k2-tiny", "Q4_K_M")
    c = compiled.new_cache()
    free = len(c.pool._free)
    compiled.forward(list(range(150)), c)
    assert len(c.pool._free) == free - 3  # 150 tokens in blocks of 64
    c.truncate(10)
    assert len(c.pool._free) == free - 1 and c.n_tokens == 10
    with pytest.raises(hr.HybridError, match="context full"):
        c.reserve(c.capacity + 1)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0, QT.IQ4_NL])
def test_32_blocks_become_q8_0_exactly(qtype):
    """Q4_0 / Q5_0 / IQ4_NL blocks re-expressed as Q8_0 hold the same values (gguf's dequantizer)."""
    from gguf import GGML_QUANT_SIZES

    rng = np.random.default_rng()
    n_blocks, nbytes = 6, GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (3, n_blocks * nbytes), dtype=np.uint8)
    d = (rng.standard_normal((3, n_blocks)) * 0.01).astype(np.float16)
    raw.reshape(3, n_blocks, nbytes)[:, :, :2] = d[..., None].view(np.uint8)
    q8 = q8_0_from_32_blocks(raw, qtype)
    assert np.array_equal(dequantize(q8, QT.Q8_0), dequantize(raw, qtype))


@pytest.mark.parametrize("mode", ["mmap", "hugepages"])
def test_no_weight_is_held_twice(tiny, mode):
    """mmap: the K-quant matrices and experts are addressed inside the mapped file; hugepages: in
    the store's copy, which replaced the file's tensor (every reader reads that one copy)."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    model = hr.load(path, threads=2, expert_store=mode)
    net, gf = model.net, model.file
    base = net.w.space.__array_interface__["data"][0]
    mm = gf._maps[0]
    lo = mm.__array_interface__["data"][0] - base
    lt = net.w.layers[1]
    names = {tb.F_Q_B: "attn_q_b", tb.F_GATE_X: "ffn_gate_exps", tb.F_UP_X: "ffn_up_exps",
             tb.F_DOWN_X: "ffn_down_exps"}  # K-quants in this file
    for field, name in names.items():
        off = net.w.mats[lt[field], M_OFF]
        assert (lo <= off < lo + mm.nbytes) == (mode == "mmap")
        assert off == gf.tensor(f"blk.1.{name}.weight").data.__array_interface__["data"][0] - base


def test_long_prefill_through_the_torch_model_shares_the_paged_cache(tiny):
    """Chunks of >= TORCH_MIN_TOKENS go through the torch model into the same paged cache; decode
    then continues in the compiled step and agrees with the torch model alone."""
    from hybrid_runtime.experts.prefill import TORCH_MIN_TOKENS

    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    compiled, ref = hr.load(path, threads=2), hr.load(path, threads=2, compiled=False)
    assert compiled.net.prefill_net is not None
    rng = np.random.default_rng()
    prompt = rng.integers(0, compiled.n_vocab, TORCH_MIN_TOKENS + 7).tolist()
    nxt = rng.integers(0, compiled.n_vocab, 4).tolist()
    c, r = compiled.new_cache(), ref.new_cache()
    a = [compiled.forward(prompt, c)] + [compiled.forward([t], c) for t in nxt]
    b = [ref.forward(prompt, r)] + [ref.forward([t], r) for t in nxt]
    assert c.n_tokens == r.n_tokens == len(prompt) + len(nxt)
    assert _rel(np.concatenate(a), np.concatenate(b)) < 0.05
