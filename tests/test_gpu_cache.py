"""GPU expert cache bookkeeping on the CPU stand-in: slots, admission, eviction, profiles, decay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from hybrid_runtime.config import RuntimeOptions
from hybrid_runtime.errors import HybridError, InvalidRequestError
from hybrid_runtime.experts.gpu_cache import (ADMIT_MARGIN, DECAY_PER_TOKEN, MAX_COPIES_PER_STEP, PROFILE_VERSION,
                                              GpuExpertCache, RoutingRecorder, RoutingStats, load_routing,
                                              read_profile)
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


def random_stats(rng, n_layer: int = 3) -> RoutingStats:
    s = RoutingStats(n_layer, E)
    for _ in range(int(rng.integers(3, 10))):
        for layer in range(1, n_layer):
            s.update(layer, rng.integers(0, E, (int(rng.integers(1, 4)), 2)))
    return s


def test_profile_save_replaces_atomically(tmp_path, monkeypatch):
    import os

    rng = np.random.default_rng()
    path = tmp_path / "profile.json"
    first, second = random_stats(rng), random_stats(rng)
    first.save_profile(path)
    second.save_profile(path)  # over an existing profile
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left
    loaded = RoutingStats(3, E)
    loaded.load_profile(path)
    np.testing.assert_array_equal(loaded.counts, second.counts)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        random_stats(rng).save_profile(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def _profile(**changes) -> dict:
    rng = np.random.default_rng()
    counts = rng.integers(0, 50, E).tolist()
    data = {"version": PROFILE_VERSION, "n_expert": E, "tokens": {"1": int(sum(counts))}, "layers": {"1": counts}}
    data.update(changes)
    return data


GARBAGE = {
    "not json": "{this is not json",
    "binary": b"\xff\xfe\x00garbage",
    "a list": "[1, 2, 3]",
    "no version": json.dumps({k: v for k, v in _profile().items() if k != "version"}),
    "wrong version": json.dumps(_profile(version=PROFILE_VERSION + 1)),
    "no layers": json.dumps({k: v for k, v in _profile().items() if k != "layers"}),
    "short row": json.dumps(_profile(layers={"1": [1, 2, 3]})),
    "negative count": json.dumps(_profile(layers={"1": [-1] * E})),
    "float count": json.dumps(_profile(layers={"1": [0.5] * E})),
    "huge count": json.dumps(_profile(layers={"1": [10**30] * E})),
    "bool n_expert": json.dumps(_profile(n_expert=True)),
    "layer name": json.dumps(_profile(layers={"one": [1] * E}, tokens={"one": 1})),
    "layers a list": json.dumps(_profile(layers=[[1] * E])),
    "no token count": json.dumps(_profile(tokens={})),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_profile_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "garbage.json"
    content = GARBAGE[kind]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    stats = RoutingStats(3, E)
    for check in (lambda: read_profile(path), lambda: stats.load_profile(path),
                  lambda: RuntimeOptions(expert_profile=str(path)).validate()):
        with pytest.raises(InvalidRequestError, match="garbage.json"):
            check()
    assert not stats.counts.any() and not stats.scores.any()  # left as it was


def test_profile_of_another_model_shape_is_rejected(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "other.json"
    random_stats(rng, n_layer=3).save_profile(path)
    RuntimeOptions(expert_profile=str(path)).validate()  # a valid profile: the shape is checked at load
    for stats in (RoutingStats(3, E * 2), RoutingStats(2, E)):  # other expert count; fewer layers
        with pytest.raises(InvalidRequestError, match="other.json"):
            stats.load_profile(path)
        assert not stats.counts.any()


@pytest.mark.parametrize("name", ["expert_profile", "record_routing"])
def test_output_paths_must_be_in_an_existing_directory(tmp_path, name):
    RuntimeOptions(**{name: str(tmp_path / "new.json")}).validate()  # a new file: fine
    with pytest.raises(InvalidRequestError, match="does not exist"):
        RuntimeOptions(**{name: str(tmp_path / "missing" / "x.json")}).validate()
    with pytest.raises(InvalidRequestError, match="must name a file"):
        RuntimeOptions(**{name: str(tmp_path)}).validate()


# -- through the hybrid path (torch on the CPU standing in for the GPU) ------------------------------
N_CTX = 256


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny("kimi-k2-tiny", "Q4_K_M")[0]


def load_hybrid(path, slots: int = 6, **opts):
    """api.load on the hybrid provider with a budget of about `slots` GPU expert-cache slots."""
    from hybrid_runtime import api
    from hybrid_runtime.models import get_architecture
    from hybrid_runtime.plan import GIB, make_plan
    from hybrid_runtime.weights.gguf_file import GGUFModelFile

    gf = GGUFModelFile(path)
    cfg = get_architecture(gf.architecture).read_config(gf)
    keep = ["token_embd=CPU"]  # else the embedding would move into the slots' room
    base = make_plan(gf.tensors, cfg, gpu_mem=64 * GIB, ram=64 * GIB, cpu_moe=True, n_ctx=N_CTX, overrides=keep)
    return api.load(path, device="hybrid", gpu_device="cpu", gpu_mem=base.gpu_total + slots * base.slot_bytes,
                    override=keep, n_ctx=N_CTX, threads=1, **opts)


def run_random_prompt(m, rng) -> None:
    ids = rng.integers(0, m.n_vocab, int(rng.integers(4, 12))).tolist()
    assert "".join(m.generate(ids, max_tokens=4, temperature=0.8, seed=int(rng.integers(1 << 30)))) is not None


def test_model_close_writes_the_profile_and_a_reload_starts_warm(tiny_model, tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "profile.json"
    m = load_hybrid(tiny_model, expert_profile=str(path))  # no profile yet: starts cold, no error
    cache = m.net_weights.cache
    assert cache is not None and cache.n_slots > 0 and not (cache.owner_layer >= 0).any()
    run_random_prompt(m, rng)
    m.close()
    m.close()  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left
    n_expert, tokens, layers = read_profile(path)
    assert n_expert == m.config.n_expert and tokens and set(layers) == set(tokens)
    assert all(m.config.is_moe_layer(l) and tokens[l] > 0 for l in tokens)
    for l, counts in layers.items():
        np.testing.assert_array_equal(counts, cache.stats.counts[l])

    with load_hybrid(tiny_model, expert_profile=str(path)) as m2:
        cache2 = m2.net_weights.cache
        routed = sum(int((c > 0).sum()) for c in layers.values())
        assert int((cache2.owner_layer >= 0).sum()) == min(cache2.n_slots, routed) > 0  # warm before any token
        np.testing.assert_array_equal(cache2.stats.counts, cache.stats.counts)
        run_random_prompt(m2, rng)
    _, tokens2, _ = read_profile(path)  # written back with the statistics of both runs
    assert all(tokens2[l] > tokens[l] for l in tokens)


def test_model_close_reports_an_unwritable_profile(tiny_model, tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    record = tmp_path / "routing.jsonl"
    m = load_hybrid(tiny_model, expert_profile=str(folder / "p.json"), record_routing=str(record))
    run_random_prompt(m, np.random.default_rng())
    folder.rmdir()
    with pytest.raises(HybridError, match="could not write the expert profile .*p.json"):
        m.close()
    assert m.net_weights.recorder._file is None  # the routing record was closed all the same
    assert load_routing(record)
    m.close()  # closed once: no second attempt


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
