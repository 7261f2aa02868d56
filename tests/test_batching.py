"""Continuous batching on the real compiled step: batch invariance, prefix sharing, the paged
cache's reference counts and copy on write (issue "Serve an agent swarm")."""

from __future__ import annotations

import time

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime.cpu.cache import BLOCK, LatentPool, PagedCache
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.engine.scheduler import Engine
from hybrid_runtime.quant.cpu_features import has_avx512_vnni

needs_step = pytest.mark.skipif(not has_avx512_vnni(), reason="the compiled step needs AVX-512 VNNI")


def test_shared_blocks_are_counted_and_copied_on_write():
    rng = np.random.default_rng()
    pool = LatentPool(2, 8, 4, 4)
    a = PagedCache(pool, 512)
    n_a = int(rng.integers(BLOCK + 1, 4 * BLOCK))
    a.reserve(n_a)
    rows = a.rows(0, n_a)
    pool.lat[:, rows] = rng.standard_normal((2, n_a, 8), dtype=np.float32)
    a.commit(n_a)
    before = pool.lat[:, rows].copy()
    n = int(rng.integers(1, n_a))  # any length: a partial last block is shared until written
    b = PagedCache(pool, 512)
    b.share_prefix(a, n)
    assert b.blocks == a.blocks[: -(-n // BLOCK)]
    assert all(pool.refs[blk] == 2 for blk in b.blocks)
    b.reserve(n + 5)  # the first write past the shared prefix
    new = b.rows(n, n + 5)
    pool.lat[:, new] = 7.0
    b.commit(5)
    assert np.array_equal(pool.lat[:, a.rows(0, n_a)], before)  # a's tokens untouched
    assert np.array_equal(pool.lat[:, b.rows(0, n)], before[:, :n])  # b reads a's prefix
    if n % BLOCK:
        assert b.blocks[-1] != a.blocks[(n - 1) // BLOCK]  # the written block was copied
    a.release()
    b.release()
    assert pool.blocks_in_use == 0 and not pool.refs.any()


@pytest.fixture(scope="module")
def small_chunk(tiny):
    """The tiny model with 64-token prompt chunks: every token through the compiled step's row
    kernels, whose arithmetic does not depend on the chunk (exact_reuse_unit 1)."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    m = hr.load(path, n_ctx=512, threads=2, prefill_chunk=64)
    yield m
    m.close()


def run(engine, prompt, params):
    steps = list(engine.submit(prompt, params))
    return [(s.token, s.logprob, tuple(s.top_logprobs or ())) for s in steps if s.token is not None], steps[-1]


def params(rng, greedy=False):
    return SamplingParams(temperature=0 if greedy else float(rng.uniform(0.5, 1.2)), seed=int(rng.integers(1 << 30)),
                          max_tokens=int(rng.integers(8, 24)), logprobs=4)


@needs_step
def test_a_sequence_gives_the_same_bits_alone_and_batched(small_chunk):
    m, rng = small_chunk, np.random.default_rng()
    assert m.exact_reuse_unit == 1
    V = m.config.n_vocab
    x = rng.integers(0, V, int(rng.integers(20, 150))).tolist()
    px = params(rng, greedy=True)
    alone = Engine(m, max_running=1)
    try:
        ref, _ = run(alone, x, px)
    finally:
        alone.close()
    crowd = Engine(m, max_running=8, pool_size=8)
    try:
        others = []
        for i in range(6):  # random prompts, one sharing most of x's prompt
            p = x[: len(x) * 3 // 4] + rng.integers(0, V, 10).tolist() if i == 0 else \
                rng.integers(0, V, int(rng.integers(5, 200))).tolist()
            others.append(crowd.submit(p, params(rng)))
        mine = crowd.submit(x, px)
        got = [(s.token, s.logprob, tuple(s.top_logprobs or ())) for s in mine if s.token is not None]
        for h in others:
            list(h)
        st = crowd.stats()
        assert st.step_tokens > st.steps  # steps decoded several sequences at once
    finally:
        crowd.close()
    assert got == ref


@needs_step
def test_short_prompt_chunks_join_the_decode_step(small_chunk):
    """New requests' prompt chunks below the mix limit run in the same step as the running
    sequences' decode tokens (one weight read), and every request still gets exactly the tokens
    and log-probabilities it gets alone (where no step is shared)."""
    m, rng = small_chunk, np.random.default_rng()
    V, limit = m.config.n_vocab, m.prompt_mix_limit
    assert 1 < limit <= m.options.prefill_chunk
    per_step = Engine(m, max_running=1)
    budget = per_step.mix_tokens  # prompt tokens a mixed step takes
    per_step.close()
    prompts = [rng.integers(0, V, int(rng.integers(2, min(limit, budget + 1)))).tolist() for _ in range(5)]
    ps = [params(rng, greedy=True) for _ in prompts]
    refs = []
    for p, sp in zip(prompts, ps):
        alone = Engine(m, max_running=1)
        try:
            refs.append(run(alone, p, sp)[0])
        finally:
            alone.close()
    shapes = []
    real = m.forward_segments

    def spy(segments, caches):
        shapes.append([len(s) for s in segments])
        return real(segments, caches)

    m.forward_segments = spy
    crowd = Engine(m, max_running=8, pool_size=8)
    try:
        first = crowd.submit(prompts[0], ps[0])
        got0 = [next(iter(first))]  # the first token: that sequence now decodes
        hs = [crowd.submit(p, sp) for p, sp in zip(prompts[1:], ps[1:])]
        got0 += list(first)
        got = [[(s.token, s.logprob, tuple(s.top_logprobs or ())) for s in got0 if s.token is not None]]
        got += [[(s.token, s.logprob, tuple(s.top_logprobs or ())) for s in h if s.token is not None] for h in hs]
    finally:
        crowd.close()
        del m.forward_segments
    assert got == refs
    assert any(max(s) > 1 and len(s) > 1 for s in shapes)  # a prompt chunk beside other tokens


@needs_step
def test_swarm_shares_the_system_prompt_blocks(small_chunk):
    m, rng = small_chunk, np.random.default_rng()
    V = m.config.n_vocab
    system = rng.integers(0, V, int(rng.integers(2 * BLOCK + 1, 3 * BLOCK - 1))).tolist()
    a = system + [1, 2, 3]
    b = system + [4, 5]
    pa, pb = params(rng, greedy=True), params(rng, greedy=True)
    fresh = Engine(m, max_running=1, pool_size=0)
    try:
        ref_a, _ = run(fresh, a, pa)
        ref_b, _ = run(fresh, b, pb)
    finally:
        fresh.close()
    e = Engine(m, max_running=4, pool_size=4)
    try:
        ha = e.submit(a, pa)
        first = ha.get(timeout=60)  # a is decoding (its prompt is in the cache)
        got_b, last_b = run(e, b, pb)
        got_a = [(s.token, s.logprob, tuple(s.top_logprobs or ())) for s in [first, *ha] if s.token is not None]
        stats = e.stats()
    finally:
        e.close()
    assert last_b.stats.cached_tokens == len(system)  # b started from a's blocks
    assert stats.shared_tokens == len(system)
    assert got_b == ref_b  # the shared KV gives b the bits it computes alone
    assert got_a == ref_a  # and a was not disturbed
    both = list(e.pool)  # the two finished sequences
    assert len(both) == 2
    full = len(system) // BLOCK
    assert both[0].cache.blocks[:full] == both[1].cache.blocks[:full]
    assert both[0].cache.blocks[full] != both[1].cache.blocks[full]  # copied on write
    pool = both[0].cache.pool
    assert all(pool.refs[blk] == 2 for blk in both[0].cache.blocks[:full])


@needs_step
def test_exact_reuse_keeps_the_default_chunks_bits(tiny):
    """With 512-token bf16 prompt chunks a prefix is reused only in whole prompt chunks."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    m = hr.load(path, n_ctx=2048, threads=2)
    rng = np.random.default_rng()
    try:
        unit = m.exact_reuse_unit
        assert unit == m.options.prefill_chunk == 512
        V = m.config.n_vocab
        system = rng.integers(0, V, unit + int(rng.integers(BLOCK, 300))).tolist()
        a, b = system + [7], system + [8, 9]
        pb = params(rng, greedy=True)
        fresh = Engine(m, max_running=1, pool_size=0, exact_reuse=True)
        try:
            ref_b, _ = run(fresh, b, pb)
        finally:
            fresh.close()
        e = Engine(m, max_running=2, pool_size=2, exact_reuse=True)
        try:
            run(e, a, params(rng))
            got_b, last = run(e, b, pb)
        finally:
            e.close()
    finally:
        m.close()
    assert last.stats.cached_tokens == unit  # the whole first chunk, not the whole system prompt
    assert got_b == ref_b


@needs_step
def test_expert_reads_count_each_chosen_expert_once_per_step(small_chunk):
    from hybrid_runtime.weights.model_file import open_model_file

    m, rng = small_chunk, np.random.default_rng()
    gf, _, cfg = open_model_file(m.file.path)
    moe = [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
    stored = m.file.panels  # the bytes the step reads: the stored panels' where the store made them
    per_expert = {i: sum(stored[t.name].nbytes if t.name in stored else t.n_bytes for t in gf.tensors.values()
                         if t.name.startswith(f"blk.{i}.") and "_exps" in t.name) // cfg.n_expert for i in moe}
    caches = [m.new_cache() for _ in range(6)]
    for c in caches:
        m.forward(rng.integers(0, cfg.n_vocab, int(rng.integers(1, 30))).tolist(), c)
    r0, b0 = m.expert_reads()
    m.forward_batch([int(rng.integers(cfg.n_vocab))], caches[:1])
    r1, b1 = m.expert_reads()
    assert r1 - r0 == cfg.n_expert_used * len(moe)  # one token: its K experts in every MoE layer
    assert b1 - b0 == cfg.n_expert_used * sum(per_expert.values())
    m.forward_batch(rng.integers(0, cfg.n_vocab, 6).tolist(), caches)
    r2, _ = m.expert_reads()
    assert cfg.n_expert_used * len(moe) <= r2 - r1 <= min(cfg.n_expert, 6 * cfg.n_expert_used) * len(moe)


@needs_step
def test_bench_swarm_serves_every_client(tiny):
    from hybrid_runtime.bench.swarm import swarm

    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    r = swarm(path, 2, [1, 3], n_gen=6, prompt_tokens=8, ttft_prompt=40, max_batch=2, max_queue=0, ttft_streams=2,
              progress=lambda row: None)
    for row in r["rows"]:
        assert row["served"] == row["clients"] and row["lost"] == 0  # the third client retried after its 503
        assert row["generated_tokens"] == 6 * row["clients"]  # ignore_eos: every stream ran its length
        assert 0 < row["mean_batch"] <= 2 and row["expert_bytes_per_token"] > 0
    assert r["healthy_after"] and r["ttft"]["idle_s"] > 0 and r["ttft"]["with_streams_s"] > 0
