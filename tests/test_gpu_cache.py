"""GPU expert cache bookkeeping on the CPU stand-in: slots, admission, eviction, profiles, decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.experts.gpu_cache import (ADMIT_MARGIN, DECAY_PER_TOKEN, MAX_COPIES_PER_STEP, GpuExpertCache,
                                              RoutingRecorder, RoutingStats, load_routing)
from hybrid_runtime.quant.torch_dequant import dequantize
from hybrid_runtime.weights.gguf_file import TensorRef

E, F, D = 8, 32, 256  # experts, expert FFN, hidden (one Q4_K / Q8_0 block per row of D / F)


def random_refs(rng, layer: int) -> tuple[TensorRef, TensorRef, TensorRef]:
    def ref(name, qtype, shape):
        rows, n = int(np.prod(shape[:-1])), shape[-1]
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, n // block * size), dtype=np.uint8)
        half = np.array([0.01], np.float16).view(np.uint8)[None]
        raw[:, 0:2] = half  # sane d at offset 0 (Q4_K, Q8_0)
        if qtype == Q.Q4_K:
            raw[:, 2:4] = half  # and dmin
        raw = raw.reshape(*shape[:-1], -1)
        return TensorRef(f"blk.{layer}.{name}", qtype, shape, raw, raw.nbytes, 0)

    return (ref("ffn_gate_exps.weight", Q.Q4_K, (E, F, D)), ref("ffn_up_exps.weight", Q.Q4_K, (E, F, D)),
            ref("ffn_down_exps.weight", Q.Q8_0, (E, D, F)))


@pytest.fixture
def cache():
    rng = np.random.default_rng()
    sources = {1: random_refs(rng, 1), 2: random_refs(rng, 2)}
    return GpuExpertCache(4, "cpu", sources, n_layer=3, n_expert=E)


def route(cache: GpuExpertCache, layer: int, ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, 1)
    cache.observe(layer, ids)
    slots = cache.lookup(layer, ids)
    cache.after_layer(layer)
    return slots


def test_slots_hold_the_experts_raw_blocks(cache):
    route(cache, 1, [3, 3, 5])
    assert cache.slot_map[1, 3] >= 0 and cache.slot_map[1, 5] >= 0
    gate, up, down = cache.expert(1, int(cache.slot_map[1, 5]))
    refs = cache.sources[1]
    for got, ref in zip((gate, up, down), refs):
        want = gguf_quants.dequantize(ref.data[5], ref.ggml_type)
        np.testing.assert_array_equal(dequantize(got, ref.ggml_type).numpy(), want)


def test_admission_limit_and_eviction_of_the_coldest(cache):
    route(cache, 1, [0, 1, 2, 3])
    assert cache.counters.copies == MAX_COPIES_PER_STEP  # at most this many copies per step
    for _ in range(3):
        route(cache, 1, [0, 1, 2, 3])
    assert sorted(np.flatnonzero(cache.slot_map[1] >= 0).tolist()) == [0, 1, 2, 3]
    # a new expert, hotter than the coldest resident by more than ADMIT_MARGIN, takes its slot
    for _ in range(6):
        route(cache, 2, [7, 7, 7])
    assert cache.slot_map[2, 7] >= 0 and cache.counters.evictions == 1
    assert int((cache.slot_map[1] >= 0).sum()) == 3


def test_no_thrash_between_equally_hot_experts(cache):
    for _ in range(4):
        route(cache, 1, [0, 1, 2, 3])
    copies = cache.counters.copies
    for _ in range(5):
        route(cache, 1, [0, 1, 2, 3, 4])  # expert 4 is as hot as the residents: below ADMIT_MARGIN
    assert cache.counters.copies == copies and cache.counters.evictions == 0
    assert ADMIT_MARGIN > 1.0


def test_hits_and_misses(cache):
    slots = route(cache, 1, [6, 6])
    assert (slots == -1).all() and cache.counters.misses == 2
    slots = route(cache, 1, [6])
    assert slots[0, 0] == cache.slot_map[1, 6] >= 0 and cache.counters.hits == 1


def test_stats_decay():
    s = RoutingStats(2, 4, decay=0.5)
    s.update(1, np.array([[0, 1]]))
    s.update(1, np.array([[0], [2]]))  # two tokens: previous scores decay by 0.25
    np.testing.assert_allclose(s.scores[1], [0.25 + 1, 0.25, 1, 0])
    np.testing.assert_array_equal(s.counts[1], [2, 1, 1, 0])
    assert 0 < DECAY_PER_TOKEN < 1


def test_profile_round_trip_and_warm_start(cache, tmp_path):
    rng = np.random.default_rng()
    for _ in range(20):
        cache.observe(1, rng.integers(0, E, (3, 2)))
        cache.observe(2, rng.integers(0, 3, (3, 2)))
    path = tmp_path / "profile.json"
    cache.stats.save_profile(path)
    fresh = RoutingStats(3, E)
    fresh.load_profile(path)
    np.testing.assert_array_equal(fresh.counts, cache.stats.counts)
    np.testing.assert_array_equal(fresh.tokens, cache.stats.tokens)
    warm = GpuExpertCache(4, "cpu", cache.sources, n_layer=3, n_expert=E, stats=fresh)
    assert warm.warm_start() == 4
    top = np.argsort(-fresh.scores[[1, 2]], axis=None)[:4]
    resident = {(1 + i // E, i % E) for i in top.tolist()}
    assert {(l, e) for l in (1, 2) for e in np.flatnonzero(warm.slot_map[l] >= 0).tolist()} == resident
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {"1": [1, 2]}, "tokens": {"1": 1}}')
    with pytest.raises(InvalidRequestError):
        RoutingStats(3, E).load_profile(bad)


def test_recorder_round_trip(tmp_path):
    rec = RoutingRecorder(tmp_path / "r.jsonl")
    a, b = np.array([[1, 2], [3, 4]]), np.array([[5, 6]])
    rec.record(1, a)
    rec.record(2, a)
    rec.record(1, b)
    rec.close()
    trace = load_routing(tmp_path / "r.jsonl")
    np.testing.assert_array_equal(trace[1], np.concatenate([a, b]))
    np.testing.assert_array_equal(trace[2], a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream_copies_complete_before_residency():
    rng = np.random.default_rng()
    c = GpuExpertCache(4, "cuda", {1: random_refs(rng, 1)}, n_layer=2, n_expert=E)
    c.observe(1, np.array([[2], [3]]))
    c.after_layer(1)
    c.drain()
    gate, _, _ = c.expert(1, int(c.slot_map[1, 2]))
    np.testing.assert_array_equal(gate.cpu().numpy(), c.sources[1][0].data[2])
