"""Cache-policy simulator on small traces whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_runtime.experts import cache_sim
from hybrid_runtime.experts.gpu_cache import RoutingRecorder, load_routing


def test_lru_hits_everything_after_the_first_cycle_when_the_cycle_fits():
    period, k, n = 5, 4, 200
    trace = cache_sim.cyclic_trace(n, n_layers=3, n_experts=64, k=k, period=period)
    hit, copies = cache_sim.simulate(trace, 64, "lru", slots=period * k)
    assert hit == pytest.approx((n - period) / n)  # only the first cycle misses
    assert copies == pytest.approx(3 * period * k / n)


def test_lru_thrashes_on_a_cycle_larger_than_the_cache():
    trace = cache_sim.cyclic_trace(200, n_layers=2, n_experts=64, k=4, period=6)  # 24 experts per layer
    hit, _ = cache_sim.simulate(trace, 64, "lru", slots=20)
    assert hit == 0.0


def test_static_beats_lru_on_stationary_zipf():
    trace = cache_sim.synthetic_trace(n_tokens=400, n_layers=3, n_experts=64, k=4, stickiness=0.0, drift=0.0,
                                      seed=int(np.random.default_rng().integers(1 << 30)))
    static, _ = cache_sim.simulate(trace, 64, "static", slots=8)
    lru, _ = cache_sim.simulate(trace, 64, "lru", slots=8)
    assert static > lru


def test_static_hit_rate_is_the_top_share():
    trace = np.zeros((10, 1, 2), dtype=np.int64)
    trace[:, 0, 0] = 1
    trace[:, 0, 1] = np.arange(10) + 2  # expert 1 always, the other one never repeats
    hit, _ = cache_sim.simulate(trace, 16, "static", slots=1)
    assert hit == pytest.approx(0.5)


def test_ours_respects_the_copy_limit_and_learns_a_stationary_set():
    trace = cache_sim.cyclic_trace(300, n_layers=2, n_experts=32, k=4, period=2)  # 8 experts per layer
    hit, copies = cache_sim.simulate(trace, 32, "ours", slots=8, max_copies=1)
    assert copies == pytest.approx(2 * 8 / 300)  # one copy per layer and token until all 8 are in
    assert hit > 0.9
    hit0, copies0 = cache_sim.simulate(trace, 32, "ours", slots=0)
    assert hit0 == 0.0 and copies0 == 0.0


def test_every_policy_is_a_rate_and_more_slots_never_hurt_static():
    trace = cache_sim.synthetic_trace(n_tokens=150, n_layers=2, n_experts=32, k=4, seed=3)
    results = cache_sim.compare(trace, 32, fractions=(0.1, 0.5))
    assert {r.policy for r in results} == set(cache_sim.POLICIES)
    assert all(0.0 <= r.hit_rate <= 1.0 for r in results)
    static = {r.fraction: r.hit_rate for r in results if r.policy == "static"}
    assert static[0.5] >= static[0.1]
    table = cache_sim.markdown_table(results)
    assert table.count("\n") == 3 and "ours" in table


def test_recorded_trace(tmp_path):
    rec = RoutingRecorder(tmp_path / "r.jsonl")
    rng = np.random.default_rng()
    a, b = rng.integers(0, 16, (5, 2)), rng.integers(0, 16, (5, 2))
    rec.record(1, a)
    rec.record(2, b)
    rec.close()
    trace = cache_sim.trace_from_record(load_routing(tmp_path / "r.jsonl"))
    assert trace.shape == (5, 2, 2)
    np.testing.assert_array_equal(trace[:, 0], a)
    np.testing.assert_array_equal(trace[:, 1], b)


def test_plot_writes_a_png(tmp_path):
    trace = cache_sim.synthetic_trace(n_tokens=50, n_layers=2, n_experts=16, k=2, seed=1)
    out = tmp_path / "p.png"
    cache_sim.plot({"t": cache_sim.compare(trace, 16, fractions=(0.25,))}, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
