"""The hybrid (GPU + CPU experts) path against the plain CPU path on the tiny Kimi K2 model.

The GPU code path runs with torch on the CPU standing in for the GPU (gpu_device="cpu"). Both
sides use exact float experts (compute="reference"), so the only differences are summation
order and the per-call dequantization: relative L2 of the logits ~1e-6 (bound 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_runtime import api
from hybrid_runtime.config import RuntimeOptions
from hybrid_runtime.experts.hybrid import HybridExperts, PrefillPolicy
from hybrid_runtime.layers import Rope
from hybrid_runtime.models import get_architecture
from hybrid_runtime.plan import GIB, PREFILL_RING, make_plan
from hybrid_runtime.weights.device import build_hybrid_weights
from hybrid_runtime.weights.gguf_file import GGUFModelFile

N_TOKENS = 24
REL_L2_BOUND = 1e-3


def build_net(path, gpu_device="cpu", slots: int | None = None, **opts):
    """Like api.load, with the hybrid provider; `slots` sizes the budget for that many cache slots."""
    gf = GGUFModelFile(path)
    arch = get_architecture(gf.architecture)
    cfg = arch.read_config(gf)
    keep = ["token_embd=CPU"]  # else the embedding would move into the slots' room
    base = make_plan(gf.tensors, cfg, gpu_mem=64 * GIB, ram=64 * GIB, cpu_moe=True, n_ctx=256, overrides=keep)
    gpu_mem = base.gpu_total + (slots or 0) * base.slot_bytes
    o = RuntimeOptions(device="hybrid", gpu_device=gpu_device, gpu_mem=gpu_mem, compute="reference", **opts).validate()
    plan = make_plan(gf.tensors, cfg, gpu_mem=gpu_mem, ram=64 * GIB, cpu_moe=o.cpu_moe, n_cpu_moe=o.n_cpu_moe,
                     overrides=o.override + keep, n_ctx=256)
    w = build_hybrid_weights(gf, cfg, o, plan)
    beta_fast, beta_slow = cfg.default_yarn_betas
    rope = Rope(cfg.qk_rope, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_orig_ctx, beta_fast, beta_slow)
    return arch.DeepSeek2(cfg, w, rope), w, plan


def run_logits(net, ids: list[int], chunk: int) -> np.ndarray:
    cache = net.new_cache(256)
    out = []
    for s in range(0, len(ids), chunk):
        out.append(net.logits(net.forward(torch.tensor(ids[s : s + chunk]), cache)))
    return torch.cat(out).float().cpu().numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def moe_backends(net) -> list[HybridExperts]:
    return [f.experts for f in net.ffn if hasattr(f, "experts")]


@pytest.fixture(scope="module")
def model(tiny):
    q, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    ref = api.load(q, compute="reference")
    ids = np.random.default_rng().integers(0, ref.n_vocab, N_TOKENS).tolist()
    return q, ids, ref.logits(ids)


def check_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    err = rel_l2(got, want)
    assert err < REL_L2_BOUND, f"relative L2 {err:.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_no_cache_matches_cpu_path(model):
    q, ids, want = model
    net, w, plan = build_net(q, slots=0)
    assert plan.cache_slots == 0 and w.cache is None
    check_close(run_logits(net, ids, chunk=N_TOKENS), want)
    assert all(b.last_split[0] == 0 for b in moe_backends(net))  # everything ran on the CPU share


def test_cache_hits_and_results_still_match(model):
    q, ids, want = model
    net, w, plan = build_net(q, slots=12)
    assert plan.cache_slots == 12 and w.cache.n_slots == 12
    check_close(run_logits(net, ids, chunk=3), want)  # 8 steps: the prefetcher admits between them
    c = w.cache.counters
    assert c.copies > 0 and c.hits > 0 and c.misses > 0, c
    assert int((w.cache.owner_layer >= 0).sum()) == 12


def test_profile_warm_start_hits_from_the_first_step(model, tmp_path):
    q, ids, want = model
    net, w, _ = build_net(q, slots=12)
    run_logits(net, ids, chunk=N_TOKENS)
    profile = tmp_path / "profile.json"
    w.cache.stats.save_profile(profile)
    net2, w2, _ = build_net(q, slots=12)  # what --expert-profile FILE does at load:
    w2.cache.stats.load_profile(profile)
    assert w2.cache.warm_start() == 12
    check_close(run_logits(net2, ids, chunk=N_TOKENS), want)
    assert w2.cache.counters.hits > 0


def test_whole_layer_on_gpu_and_prefill_offload(model):
    q, ids, want = model
    net, w, plan = build_net(q, slots=16, override=[r"blk\.2\.ffn_.*_exps=GPU"])  # room for layer 2
    assert plan.expert_layers == {1: "cpu", 2: "gpu"}
    backends = moe_backends(net)
    backends[0].prefill = PrefillPolicy(cpu_flops=1.0, min_tokens=2)  # force layer 1 to upload and run on the GPU
    check_close(run_logits(net, ids, chunk=N_TOKENS), want)
    assert backends[0].last_split == (N_TOKENS * 4, 0) and backends[1].last_split == (N_TOKENS * 4, 0)


def test_recording_routing(model, tmp_path):
    from hybrid_runtime.experts.gpu_cache import RoutingRecorder, load_routing

    q, ids, _ = model
    net, w, _ = build_net(q, slots=4)
    rec = RoutingRecorder(tmp_path / "routing.jsonl")
    for b in moe_backends(net):
        b.recorder = rec
    run_logits(net, ids, chunk=8)
    rec.close()
    trace = load_routing(tmp_path / "routing.jsonl")
    assert sorted(trace) == [1, 2] and trace[1].shape == (N_TOKENS, 4)
    assert np.array_equal(np.sort(trace[1].ravel()) >= 0, np.ones(N_TOKENS * 4, bool))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_matches_cpu_path(model):
    q, ids, want = model
    net, w, _ = build_net(q, gpu_device="cuda", slots=12)
    got = run_logits(net, ids, chunk=3)
    assert rel_l2(got, want) < 3e-2  # bf16 matmuls on the GPU
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_prefill_offload_streams_the_next_layer(model, tmp_path):
    """Both MoE layers offloaded through the ring: layer 2's uploads start before its routing."""
    q, ids, want = model
    net, w, plan = build_net(q, slots=0)
    assert plan.prefill_slots == PREFILL_RING and w.stream is not None and w.stream.n_ring == PREFILL_RING
    for b in moe_backends(net):
        b.prefill = PrefillPolicy(cpu_flops=1.0, min_tokens=2)
    got, routed = run_recorded(net, ids, tmp_path)
    check_close(got, want)
    c = w.stream.counters
    distinct = [np.unique(r).size for r in routed]
    assert all(b.last_split == (N_TOKENS * 4, 0) for b in moe_backends(net))
    # after layer 1, layer 2's experts (all predicted: 24 tokens cover 16 experts) filled the ring in
    # id order; the used ones among them were ready when layer 2's routing arrived
    ready = len(set(range(PREFILL_RING)) & set(np.unique(routed[1]).tolist()))
    assert c.ready_at_begin == ready > 0
    assert c.uploads == sum(distinct) + PREFILL_RING - ready  # + the wrong guesses already uploaded
    assert c.wasted_uploads == PREFILL_RING - ready
    assert c.prefetched == 16 and c.prefetch_used == distinct[1] and c.prefetch_wasted == 16 - distinct[1]
    assert c.max_loaded <= PREFILL_RING


def test_prefill_offload_uses_cached_experts_in_place(model, tmp_path):
    q, ids, _ = model
    net, w, plan = build_net(q, slots=6)
    run_logits(net, ids, chunk=3)  # warm the cache
    w.cache.drain()
    resident_before = w.cache.slot_map.copy()
    w.cache.after_layer = lambda *a, **k: None  # no admissions during the run: residency stays fixed
    for b in moe_backends(net):
        b.prefill = PrefillPolicy(cpu_flops=1.0, min_tokens=2)
    ids2 = np.random.default_rng().integers(0, net.cfg.n_vocab, N_TOKENS).tolist()
    got, routed = run_recorded(net, ids2, tmp_path)
    check_close(got, api.load(q, compute="reference").logits(ids2))
    resident = [int((resident_before[l][np.unique(r)] >= 0).sum()) for l, r in zip((1, 2), routed)]
    assert sum(resident) > 0
    c = w.stream.counters
    assert c.uploads - c.wasted_uploads == sum(np.unique(r).size for r in routed) - sum(resident)


def test_expert_stream_random_schedules(model):
    """Whatever is predicted, the ring hands out each expert's exact bytes and never overfills."""
    from hybrid_runtime.experts.backends import expert_refs
    from hybrid_runtime.experts.stream import ExpertStream

    q, _, _ = model
    gf = GGUFModelFile(q)
    refs = {l: expert_refs(gf, l) for l in (1, 2)}
    rng = np.random.default_rng()
    n_ring = int(rng.integers(2, 6))
    stream = ExpertStream(n_ring, "cpu", refs)
    for step in range(12):
        layer = (1, 2)[step % 2]
        if rng.random() < 0.7:  # a guess, partly wrong, sometimes for the other layer
            stream.prefetch(int(rng.choice([1, 2])), rng.permutation(16)[: rng.integers(1, 17)].tolist())
        want = sorted(rng.permutation(16)[: rng.integers(1, 17)].tolist())
        order = stream.begin_layer(layer, want)
        assert sorted(order) == want
        for e in order:
            (gate, up, down), i = stream.take(layer, e)
            for got, r in zip((gate, up, down), refs[layer]):
                assert np.array_equal(got.numpy(), np.asarray(r.data[e]))
            stream.release(layer, e, i)
    c = stream.counters
    assert c.max_loaded <= n_ring and c.prefetch_used + c.prefetch_wasted <= c.prefetched


def run_recorded(net, ids: list[int], tmp_path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of `ids` as one batch and each MoE layer's expert ids [T, K] in that run."""
    from hybrid_runtime.experts.gpu_cache import RoutingRecorder, load_routing

    path = tmp_path / f"routing-{np.random.default_rng().integers(1 << 30)}.jsonl"
    rec = RoutingRecorder(path)
    for b in moe_backends(net):
        b.recorder = rec
    got = run_logits(net, ids, chunk=len(ids))
    for b in moe_backends(net):
        b.recorder = None
    rec.close()
    trace = load_routing(path)
    return got, [trace[l] for l in sorted(trace)]


def test_speculative_guess_feeds_the_ring_and_the_cache(model):
    """Layer 2's router on layer 1's input: downloaded with layer 1's routing, used by both prefetchers."""
    q, ids, want = model
    net, w, _ = build_net(q, slots=6, speculative_prefetch=True)
    backends = moe_backends(net)
    assert backends[0].speculate is not None and backends[1].speculate is None  # layer 2 is the last
    for b in backends:
        b.prefill = PrefillPolicy(cpu_flops=1.0, min_tokens=2)
    check_close(run_logits(net, ids, chunk=4), want)  # 4 tokens cover < 90 % of 16 experts: the guess decides
    c = w.stream.counters
    assert 0 < c.prefetched <= 4 * 4 * (N_TOKENS // 4) and c.prefetch_used > 0  # at most the guessed pairs
    net2, w2, _ = build_net(q, slots=6, speculative_prefetch=True)  # decode-sized steps: the cache path
    check_close(run_logits(net2, ids, chunk=1), want)
    assert w2.cache.counters.copies > 0 and w2.stream.counters.uploads == 0


def test_cuda_graphs_option_is_inert_without_cuda(model):
    from hybrid_runtime.weights.device import GraphedLinear

    q, ids, want = model
    net, w, _ = build_net(q, slots=0, cuda_graphs=True)
    assert not w.cuda_graphs and not isinstance(net.attn[0].wkv_a, GraphedLinear)
    check_close(run_logits(net, ids, chunk=1), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_cuda_graphs_replay_the_eager_result(model):
    from hybrid_runtime.weights.device import GraphedLinear

    q, ids, _ = model
    eager, _, _ = build_net(q, gpu_device="cuda", slots=0)
    graphed, w, _ = build_net(q, gpu_device="cuda", slots=0, cuda_graphs=True)
    a, b = run_logits(eager, ids, chunk=1), run_logits(graphed, ids, chunk=1)
    linears = [l.wkv_a for l in graphed.attn] + [graphed.head]
    assert all(isinstance(l, GraphedLinear) and l.graph is not None and not l.failed for l in linears)
    assert rel_l2(b, a) < 1e-5  # the same kernels, replayed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_prefill_offload_through_the_ring(model):
    q, ids, want = model
    net, w, _ = build_net(q, gpu_device="cuda", slots=4)
    for b in moe_backends(net):
        b.prefill = PrefillPolicy(cpu_flops=1.0, min_tokens=2)
    got = run_logits(net, ids, chunk=N_TOKENS)
    w.stream.drain()
    assert rel_l2(got, want) < 3e-2  # bf16 matmuls on the GPU
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    assert w.stream.counters.uploads > 0 and w.stream.counters.ready_at_begin > 0


def test_bench_gpu_runs_every_configuration_on_a_stand_in(tiny):
    """`bench gpu` on the CPU stand-in: each configuration agrees with the CPU path (no timing claims)."""
    from hybrid_runtime.bench.gpu import CONFIGS, bench_gpu, markdown

    q, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    r = bench_gpu(q, n_prompt=int(np.random.default_rng().integers(80, 120)), n_gen=4, stand_in="cpu",
                  seed=int(np.random.default_rng().integers(1 << 20)))
    assert list(r["configs"]) == list(CONFIGS)
    for name, row in r["configs"].items():
        assert row["prefill_tps"] > 0 and row["decode_tps"] > 0
        assert row["top1_vs_cpu"] > 0.9 and row["rel_l2_vs_cpu"] < 5e-2, (name, row)
    assert r["configs"]["gpu, cache on"]["cache_slots"] > 0 and "cache_slots" not in r["configs"]["gpu, cache off"]
    assert markdown(r).count("\n") == len(CONFIGS) + 1


def test_no_prefetch_for_a_next_layer_that_would_stay_on_the_cpu(model):
    """Layer 2's experts are larger (Q6_K down): a CPU speed between the two layers' break-evens
    offloads layer 1 but predicts that layer 2 stays on the CPU, so nothing is prefetched for it."""
    q, ids, want = model
    net, w, _ = build_net(q, slots=0)
    b1, b2 = moe_backends(net)
    assert w.stream.layouts[2].n_bytes > w.stream.layouts[1].n_bytes
    T, K, E = N_TOKENS, 4, 16
    distinct = round(E * (1 - (1 - K / E) ** T))
    cpu_s = lambda layer: distinct * w.stream.layouts[layer].n_bytes / PrefillPolicy().pcie_bytes_per_s  # noqa: E731
    flops = (T * K * b1.flops_per_pair) / ((cpu_s(1) + cpu_s(2)) / 2)  # break-even between the layers
    for b in (b1, b2):
        b.prefill = PrefillPolicy(cpu_flops=flops, min_tokens=2)
    check_close(run_logits(net, ids, chunk=N_TOKENS), want)
    assert b1.last_split == (T * K, 0)  # layer 1 did offload
    assert w.stream.counters.prefetched == 0
