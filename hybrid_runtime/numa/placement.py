"""Where the routed experts live across NUMA nodes, and the executor that runs them there.

Placements:
  partition   one copy; node n holds rows [f0:f1) of every expert's gate/up and the same
              columns of down (256-aligned), its pinned threads compute that share, and the
              partial outputs are summed. No memory is doubled.
  interleave  one copy with pages interleaved across nodes; each node computes a share of F.
  replicate   a full copy per node (n_nodes x the memory); each node computes a share of F
              reading only local memory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from hybrid_runtime.errors import HybridError
from hybrid_runtime.numa import memory
from hybrid_runtime.numa.topology import Node, Topology

log = logging.getLogger(__name__)

PLACEMENTS = ("partition", "interleave", "replicate")
ALIGN = 256  # elements per K-quant super-block: a share boundary never cuts a block


def partition_ranges(F: int, weights_per_node: list[float], align: int = ALIGN) -> list[tuple[int, int]]:
    """Split [0, F) into contiguous, `align`-aligned shares proportional to the weights.

    Every row is in exactly one share; a node with weight 0 gets an empty share (f0 == f1).
    """
    w = np.asarray(weights_per_node, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise HybridError(f"NUMA share weights must be non-negative with a positive sum, got {list(weights_per_node)}.")
    units = -(-F // align)  # the last unit may be shorter when F is not a multiple of align
    exact = units * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: units - counts.sum()]:
        counts[i] += 1  # largest remainders
    bounds = np.minimum(np.concatenate([[0], np.cumsum(counts)]) * align, F)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(w))]


def placement_memory(placement: str, expert_bytes: int, n_nodes: int,
                     shares: list[float] | None = None) -> dict[int, int]:
    """Bytes of routed experts each node holds under `placement` (node index -> bytes)."""
    check_placement(placement)
    if placement == "replicate":
        return {n: expert_bytes for n in range(n_nodes)}
    frac = np.asarray(shares if shares is not None else [1.0] * n_nodes, dtype=np.float64)
    frac = frac / frac.sum()
    if placement == "interleave":
        frac = np.full(n_nodes, 1.0 / n_nodes)
    per = np.floor(frac * expert_bytes).astype(np.int64)
    per[-1] += expert_bytes - per.sum()
    return {n: int(per[n]) for n in range(n_nodes)}


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise HybridError(f"Unknown NUMA placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")


def default_placement(topology: Topology, tune_config: Any | None = None) -> str:
    """The tuned placement when a config is given, else `partition` (one copy, local reads)."""
    if tune_config is not None and getattr(tune_config, "placement", None):
        check_placement(tune_config.placement)
        return tune_config.placement
    return "partition"


# ---------------------------------------------------------------- expert slicing and copies


def _bytes_per_element_block(qtype: Any) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


def slice_experts(experts: Any, f0: int, f1: int) -> Any:
    """A view of `experts` restricted to intermediate rows/columns [f0, f1) (no copy)."""
    block, type_size = _bytes_per_element_block(experts.down_type)
    if f0 % block or (f1 % block and f1 != experts.n_ff):
        raise HybridError(f"NUMA share [{f0}, {f1}) does not fall on {block}-element block boundaries.")
    b0, b1 = f0 // block * type_size, -(-f1 // block) * type_size
    return dataclasses.replace(
        experts,
        gate=experts.gate[:, f0:f1],  # [E, f, row_bytes]
        up=experts.up[:, f0:f1],  # [E, f, row_bytes]
        down=experts.down[:, :, b0:b1],  # [E, D, f_bytes]
        n_ff=f1 - f0,
    )


def copy_experts(experts: Any, mode: int, nodes: list[int], keep: list) -> Any:
    """Copy gate/up/down into fresh memory bound with (mode, nodes); buffers appended to keep."""
    arrays = {}
    for name in ("gate", "up", "down"):
        src = getattr(experts, name)
        buf = memory.alloc(src.nbytes, mode, nodes)
        dst = buf.array.view(src.dtype).reshape(src.shape)
        np.copyto(dst, src)  # first touch: pages land per the policy (or on this thread's node)
        keep.append(buf)
        arrays[name] = dst
    return dataclasses.replace(experts, **arrays)


# ---------------------------------------------------------------- executor


@dataclass(slots=True)
class MemoryReport:
    """Routed-expert bytes per node: planned, and resident as the kernel reports it."""

    placement: str
    planned: dict[int, int]  # node id -> bytes
    resident: dict[int, int] | None  # node id -> bytes (None where the kernel cannot say)
    total: int

    def lines(self) -> list[str]:
        out = [f"placement {self.placement}: {self.total / 2**20:.1f} MiB of expert copies"]
        for node, b in sorted(self.planned.items()):
            res = "n/a" if self.resident is None else f"{self.resident.get(node, 0) / 2**20:.1f} MiB"
            out.append(f"  node {node}: planned {b / 2**20:.1f} MiB, resident {res}")
        return out


@dataclass(slots=True)
class _Share:
    experts: Any  # ExpertWeights this node reads
    ff_range: tuple[int, int] | None  # None: `experts` is already the node's slice


@dataclass(slots=True)
class _Worker:
    node: Node
    threads: int
    f_range: tuple[int, int]
    pool: ThreadPoolExecutor
    buffers: list = field(default_factory=list)


def _default_forward() -> Callable:
    from hybrid_runtime.experts.moe_cpu import moe_forward  # lazy: numba compiles on use

    return moe_forward


def _init_worker(cpus: list[int], threads: int) -> None:
    memory.pin_thread(cpus)
    try:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # thread-local
    except ImportError:
        pass


class NumaExpertExecutor:
    """Runs routed experts with one pinned worker thread per NUMA node and sums the partials.

    `forward` has moe_cpu.moe_forward's signature (the default, imported on first use).
    """

    def __init__(self, topology: Topology, placement: str = "partition",
                 threads_per_node: Mapping[int, int] | None = None, forward: Callable | None = None):
        check_placement(placement)
        nodes = topology.compute_nodes()
        if not nodes:
            raise HybridError("No NUMA node has a CPU this process may run on.")
        self.topology, self.placement, self._forward = topology, placement, forward
        threads = {n.id: (threads_per_node or {}).get(n.id, len(n.cpus)) for n in nodes}
        self.workers = [self._make_worker(n, threads[n.id]) for n in nodes if threads[n.id] > 0]
        if not self.workers:
            raise HybridError("The NUMA config gives every node 0 threads; give at least one node a thread.")
        self.layers: dict[int, list[_Share]] = {}
        self._serial = threading.Lock() if len(self.workers) > 1 else None
        self._F: int | None = None

    @staticmethod
    def _make_worker(node: Node, threads: int) -> _Worker:
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"numa{node.id}",
                                  initializer=_init_worker, initargs=(node.cpus[:threads] or node.cpus, threads))
        return _Worker(node=node, threads=threads, f_range=(0, 0), pool=pool)

    def _set_ranges(self, F: int) -> None:
        if self._F == F:
            return
        if self._F is not None:
            raise HybridError("All MoE layers given to one NUMA executor must share the expert FFN size.")
        self._F = F
        for w, r in zip(self.workers, partition_ranges(F, [w.threads for w in self.workers])):
            w.f_range = r

    def load(self, layers: Mapping[int, Any]) -> MemoryReport:
        """Place every layer's ExpertWeights per the placement; returns the memory report."""
        for layer, experts in layers.items():
            self._set_ranges(experts.n_ff)
            self.layers[layer] = self._place(experts)
        return self.memory_report()

    def _place(self, experts: Any) -> list[_Share]:
        if self.placement == "interleave":
            ids = [w.node.id for w in self.workers]
            mode = memory.MPOL_INTERLEAVE if len(ids) > 1 else memory.MPOL_BIND
            shared = copy_experts(experts, mode, ids, self.workers[0].buffers)
            return [_Share(shared, w.f_range) for w in self.workers]
        jobs = [w.pool.submit(self._place_on_node, w, experts) for w in self.workers]
        return [j.result() for j in jobs]

    def _place_on_node(self, w: _Worker, experts: Any) -> _Share:
        # runs on the node's pinned thread, so first touch is local even if mbind is refused
        if self.placement == "partition":
            part = copy_experts(slice_experts(experts, *w.f_range), memory.MPOL_BIND, [w.node.id], w.buffers)
            return _Share(part, None)
        return _Share(copy_experts(experts, memory.MPOL_BIND, [w.node.id], w.buffers), w.f_range)

    def forward(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Routed-expert output for one layer: x [T, D] float32, ids/weights [T, K] -> [T, D]."""
        fn = self._forward or _default_forward()
        shares = self.layers[layer]
        active = [(w, s) for w, s in zip(self.workers, shares) if w.f_range[0] < w.f_range[1]]
        if self._concurrent_ok():
            jobs = [w.pool.submit(self._run, fn, s, x, ids, weights) for w, s in active]
            parts = [j.result() for j in jobs]
        else:
            parts = [w.pool.submit(self._run, fn, s, x, ids, weights).result() for w, s in active]
        out = parts[0].astype(np.float32, copy=True)  # [T, D]
        for p in parts[1:]:
            out += p
        return out

    @staticmethod
    def _run(fn: Callable, share: _Share, x, ids, weights) -> np.ndarray:
        if share.ff_range is None:
            return fn(x, ids, weights, share.experts)
        return fn(x, ids, weights, share.experts, ff_range=share.ff_range)

    def _concurrent_ok(self) -> bool:
        # numba's workqueue layer aborts on concurrent parallel launches; omp and tbb do not
        if self._serial is None:
            return True
        try:
            import numba

            return numba.threading_layer() != "workqueue"
        except (ImportError, ValueError):  # ValueError: no parallel kernel has run yet
            return False

    def memory_report(self) -> MemoryReport:
        planned: dict[int, int] = {}
        resident: dict[int, int] = {}
        for w in self.workers:
            planned[w.node.id] = 0
            for buf in w.buffers:
                for node, b in memory.page_nodes(buf.array).items():
                    resident[node] = resident.get(node, 0) + b
        total = sum(buf.array.nbytes for w in self.workers for buf in w.buffers)
        self._plan_bytes(planned, total)
        return MemoryReport(self.placement, planned, resident or None, total)

    def _plan_bytes(self, planned: dict[int, int], total: int) -> None:
        ids = list(planned)
        if self.placement == "partition":
            for w in self.workers:
                planned[w.node.id] = sum(b.array.nbytes for b in w.buffers)
        else:
            per_copy = total // (len(ids) if self.placement == "replicate" else 1)
            mem = placement_memory(self.placement, per_copy, len(ids))
            planned.update({ids[i]: b for i, b in mem.items()})

    def close(self) -> None:
        for w in self.workers:
            w.pool.shutdown(wait=True)
        self.layers.clear()

    def __enter__(self) -> "NumaExpertExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
