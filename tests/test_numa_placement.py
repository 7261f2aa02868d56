import dataclasses

import numpy as np
import pytest
from gguf.quants import dequantize

from hybrid_runtime.errors import HybridError
from hybrid_runtime.numa import memory
from hybrid_runtime.numa.placement import (
    NumaExpertExecutor, default_placement, partition_ranges, placement_memory, slice_experts,
)
from hybrid_runtime.numa.topology import Node, Topology, discover
from hybrid_runtime.numa.tune import Q4_K_TYPE, NumaConfig, random_q4k_blocks


@dataclasses.dataclass(slots=True)
class StandInExperts:
    gate: np.ndarray  # [E, F, row_bytes(D)]
    up: np.ndarray  # [E, F, row_bytes(D)]
    down: np.ndarray  # [E, D, row_bytes(F)]
    gate_type: int
    up_type: int
    down_type: int
    n_expert: int
    n_ff: int
    hidden: int


def standin_moe_forward(x, ids, weights, experts, *, ff_range=None, out=None):
    """Float64 reference with moe_cpu.moe_forward's signature (dequantize, then matmul)."""
    f0, f1 = ff_range or (0, experts.n_ff)
    y = np.zeros((x.shape[0], experts.hidden))  # [T, D]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            g = dequantize(experts.gate[e, f0:f1], experts.gate_type).astype(np.float64)  # [f, D]
            u = dequantize(experts.up[e, f0:f1], experts.up_type).astype(np.float64)  # [f, D]
            d = dequantize(experts.down[e], experts.down_type).astype(np.float64)[:, f0:f1]  # [D, f]
            a, b = g @ x[t], u @ x[t]
            y[t] += weights[t, k] * (d @ (a / (1 + np.exp(-a)) * b))
    if out is not None:
        out[...] = y
        return out
    return y.astype(np.float32)


def moe_impl():
    """The real kernel once hybrid_runtime.experts.moe_cpu exists, the stand-in until then."""
    try:
        from hybrid_runtime.experts.moe_cpu import ExpertWeights, moe_forward
        return moe_forward, ExpertWeights
    except ImportError:
        return standin_moe_forward, StandInExperts


def make_experts(rng, cls, E=4, D=256, F=768):
    return cls(gate=random_q4k_blocks(rng, (E, F), D), up=random_q4k_blocks(rng, (E, F), D),
               down=random_q4k_blocks(rng, (E, D), F), gate_type=Q4_K_TYPE, up_type=Q4_K_TYPE,
               down_type=Q4_K_TYPE, n_expert=E, n_ff=F, hidden=D)


def routing(rng, T, E, K, D):
    x = rng.standard_normal((T, D)).astype(np.float32)  # [T, D]
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)  # [T, K]
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)  # [T, K]
    return x, ids, w


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def split_topology() -> Topology:
    """Two synthetic nodes on this machine's CPUs (node 1 does not exist: mbind is refused)."""
    cpus = sorted(__import__("os").sched_getaffinity(0))
    halves = [cpus[: max(1, len(cpus) // 2)], cpus[len(cpus) // 2:] or cpus[:1]]
    nodes = [Node(i, c, 1 << 34, 1 << 33) for i, c in enumerate(halves)]
    return Topology(nodes=nodes, distances=[[10, 21], [21, 10]], thp="madvise", source="test")


# ---------------------------------------------------------------- arithmetic


def check_ranges(F, weights, ranges):
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == F
    for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
        assert a1 == b0  # contiguous: each row exactly once
    for (f0, f1), w in zip(ranges, weights):
        assert f0 <= f1 and (f0 % 256 == 0 or f0 == F) and (f1 % 256 == 0 or f1 == F)
        if w == 0:
            assert f0 == f1
    units = -(-F // 256)
    exact = units * np.asarray(weights) / np.sum(weights)
    got = np.array([-(-(f1 - f0) // 256) for f0, f1 in ranges])
    assert np.all(np.abs(got - exact) < 1.0 + 1e-9)  # proportional within one block


def test_partition_ranges_randomized():
    rng = np.random.default_rng()
    for _ in range(500):
        F = int(rng.integers(1, 64)) * 256 - (int(rng.integers(0, 256)) if rng.random() < 0.2 else 0)
        n = int(rng.integers(1, 9))
        weights = list(rng.integers(0, 60, n).astype(float))
        if sum(weights) == 0:
            weights[0] = 1.0
        check_ranges(F, weights, partition_ranges(F, weights))


def test_partition_ranges_examples():
    assert partition_ranges(2048, [1, 1]) == [(0, 1024), (1024, 2048)]
    assert partition_ranges(2048, [3, 1]) == [(0, 1536), (1536, 2048)]
    assert partition_ranges(2048, [1, 1, 1, 1]) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]
    assert partition_ranges(768, [1]) == [(0, 768)]
    for bad in ([], [0, 0], [1, -1], [float("nan")]):
        with pytest.raises(HybridError):
            partition_ranges(2048, bad)


def test_placement_memory():
    b = 10**12 + 7
    for n in (1, 2, 4):
        part = placement_memory("partition", b, n)
        assert sum(part.values()) == b and len(part) == n
        assert sum(placement_memory("interleave", b, n).values()) == b
        assert placement_memory("replicate", b, n) == {i: b for i in range(n)}
    assert placement_memory("partition", 1000, 2, shares=[3, 1]) == {0: 750, 1: 250}
    with pytest.raises(HybridError):
        placement_memory("mirror", b, 2)


def test_default_placement():
    topo = discover()
    assert default_placement(topo) == "partition"
    assert default_placement(topo, NumaConfig("interleave", {0: 1})) == "interleave"
    with pytest.raises(HybridError):
        default_placement(topo, NumaConfig("everywhere", {0: 1}))


def test_slice_experts_matches_dequantized_slices():
    rng = np.random.default_rng()
    ex = make_experts(rng, StandInExperts, E=2, D=256, F=768)
    part = slice_experts(ex, 256, 768)
    assert part.n_ff == 512
    full_down = dequantize(ex.down, Q4_K_TYPE)  # [E, D, F]
    np.testing.assert_array_equal(dequantize(part.down, Q4_K_TYPE), full_down[:, :, 256:768])
    np.testing.assert_array_equal(dequantize(part.gate, Q4_K_TYPE), dequantize(ex.gate, Q4_K_TYPE)[:, 256:768])
    with pytest.raises(HybridError):
        slice_experts(ex, 100, 768)


# ---------------------------------------------------------------- executor, end to end


@pytest.mark.parametrize("placement", ["partition", "interleave", "replicate"])
def test_pinned_executor_matches_unpinned_forward_this_machine(placement):
    forward, cls = moe_impl()
    rng = np.random.default_rng()
    ex = make_experts(rng, cls)
    x, ids, w = routing(rng, T=3, E=ex.n_expert, K=2, D=ex.hidden)
    expected = forward(x, ids, w, ex)
    with NumaExpertExecutor(discover(), placement, forward=forward) as numa:
        report = numa.load({0: ex})
        got = numa.forward(0, x, ids, w)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert rel_l2(got, expected) < 1e-4
    copies = len(discover().compute_nodes()) if placement == "replicate" else 1
    assert report.total == copies * (ex.gate.nbytes + ex.up.nbytes + ex.down.nbytes)


@pytest.mark.parametrize("placement", ["partition", "interleave", "replicate"])
def test_two_worker_split_sums_to_whole(placement):
    forward, cls = moe_impl()
    rng = np.random.default_rng()
    ex = make_experts(rng, cls, E=3, D=256, F=768)
    x, ids, w = routing(rng, T=2, E=3, K=2, D=256)
    expected = forward(x, ids, w, ex)
    with NumaExpertExecutor(split_topology(), placement, forward=forward) as numa:
        report = numa.load({5: ex})
        assert [wk.f_range for wk in numa.workers] == partition_ranges(768, [wk.threads for wk in numa.workers])
        got = numa.forward(5, x, ids, w)
    assert rel_l2(got, expected) < 1e-4
    one_copy = ex.gate.nbytes + ex.up.nbytes + ex.down.nbytes
    assert report.total == (2 * one_copy if placement == "replicate" else one_copy)
    assert sum(report.planned.values()) == report.total


def test_memory_report_resident_on_this_node():
    forward, cls = moe_impl()
    ex = make_experts(np.random.default_rng(), cls, E=8, D=512, F=1024)
    topo = discover()
    with NumaExpertExecutor(topo, "partition", forward=forward) as numa:
        report = numa.load({0: ex})
    one_copy = ex.gate.nbytes + ex.up.nbytes + ex.down.nbytes
    assert report.total == one_copy and sum(report.planned.values()) == one_copy
    if report.resident is not None:  # move_pages answered: pages are where the plan says
        node = topo.compute_nodes()[0].id
        assert abs(report.resident.get(node, 0) - one_copy) < 0.05 * one_copy
    assert "partition" in report.lines()[0]


def test_alloc_binds_and_holds_data():
    buf = memory.alloc(3 << 20, memory.MPOL_BIND, [discover().compute_nodes()[0].id])
    assert buf.array.nbytes == 3 << 20
    assert buf.array.__array_interface__["data"][0] % memory.HUGE_2M == 0
    data = np.random.default_rng().integers(0, 256, 3 << 20, dtype=np.uint8)
    buf.array[:] = data
    np.testing.assert_array_equal(buf.array, data)
    assert memory.mbind(buf.array, memory.MPOL_BIND, [1023]) is False  # refused, not raised
    assert memory.pin_thread([]) is False


def test_workers_are_pinned_to_their_node():
    import os

    with NumaExpertExecutor(split_topology(), "partition", forward=standin_moe_forward) as numa:
        for wk in numa.workers:
            assert wk.pool.submit(os.sched_getaffinity, 0).result() == set(wk.node.cpus)
    assert os.sched_getaffinity(0) >= set(split_topology().cpus)  # the caller is left alone
