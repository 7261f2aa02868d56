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
from hybrid_runtime.plan import GIB, make_plan
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
