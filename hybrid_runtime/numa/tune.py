"""numa-tune: measure memory bandwidth and MoE kernel scaling per NUMA node, write a config.

The config (`--numa-config`) is JSON:
  {"version": 1, "placement": "partition", "threads_per_node": {"0": 28, ...},
   "nodes": [{"id": 0, "cpus": [...], "mem_free": ...}], "hugepages": {...}, "measured": {...}}
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer

from hybrid_runtime.errors import HybridError
from hybrid_runtime.numa import memory
from hybrid_runtime.numa.placement import check_placement, partition_ranges, placement_memory
from hybrid_runtime.numa.topology import Node, Topology, discover

CONFIG_VERSION = 1
KIMI_D, KIMI_F = 7168, 2048  # Kimi K2 hidden size and expert FFN size
Q4_K_TYPE = 12  # GGMLQuantizationType.Q4_K
Q4_K_BLOCK, Q4_K_BYTES = 256, 144


@dataclass(slots=True)
class NumaConfig:
    """A tuned NUMA plan, as written by numa-tune and read by `--numa-config`."""

    placement: str
    threads_per_node: dict[int, int]  # node id -> worker threads
    nodes: list[dict] = field(default_factory=list)
    hugepages: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["threads_per_node"] = {str(k): v for k, v in self.threads_per_node.items()}
        return json.dumps({"version": d.pop("version"), **d}, indent=2)


def save_numa_config(config: NumaConfig, path: str | Path) -> None:
    try:
        Path(path).write_text(config.to_json() + "\n")
    except OSError as e:
        raise HybridError(f"Cannot write the NUMA config to {path}: {e.strerror}.") from None


def load_numa_config(path: str | Path) -> NumaConfig:
    """Read a numa-tune config; every problem is a HybridError naming the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise HybridError(f"NUMA config {p} does not exist; run `hybrid-runtime numa-tune --out {p}` first.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HybridError(f"NUMA config {p} is not readable JSON ({e}); rerun numa-tune to rewrite it.") from None
    if not isinstance(data, dict):
        raise HybridError(f"NUMA config {p} must hold a JSON object; rerun numa-tune to rewrite it.")
    if data.get("version") != CONFIG_VERSION:
        raise HybridError(f"NUMA config {p} has version {data.get('version')!r}, this runtime reads version "
                          f"{CONFIG_VERSION}; rerun numa-tune.")
    try:
        config = NumaConfig(
            placement=str(data["placement"]),
            threads_per_node={int(k): int(v) for k, v in dict(data["threads_per_node"]).items()},
            nodes=list(data.get("nodes", [])),
            hugepages=dict(data.get("hugepages", {})),
            measured=dict(data.get("measured", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise HybridError(f"NUMA config {p} lacks or mangles field {e}; rerun numa-tune to rewrite it.") from None
    try:
        check_placement(config.placement)
    except HybridError as e:
        raise HybridError(f"NUMA config {p}: {e}") from None
    if any(t < 0 for t in config.threads_per_node.values()):
        raise HybridError(f"NUMA config {p} has a negative thread count.")
    return config


def model_expert_bytes(path: str | Path) -> int:
    """Bytes of routed-expert tensors (names containing `_exps`) in a GGUF file."""
    from hybrid_runtime.weights.gguf_file import GGUFModelFile

    gf = GGUFModelFile(path)  # the loader's container checks: a corrupt file is one clear error
    return sum(t.n_bytes for t in gf.tensors.values() if "_exps" in t.name)


# ---------------------------------------------------------------- measurement


def _stream_kernel() -> Callable:
    import numba

    @numba.njit(cache=True)
    def row_sum(row):  # [n] uint64; the plain loop vectorizes, a 4-way unrolled one did not
        s = np.uint64(0)
        for j in range(row.size):
            s += row[j]
        return s

    @numba.njit(parallel=True, cache=True)
    def stream_sum(a):  # [rows, n] uint64
        acc = np.zeros(a.shape[0], np.uint64)
        for i in numba.prange(a.shape[0]):
            acc[i] = row_sum(a[i])
        return acc.sum()

    return stream_sum


def _in_pinned_thread(cpus: list[int], threads: int, fn: Callable[[], Any]) -> Any:
    """Run fn on a fresh thread pinned to `cpus` with `threads` numba threads (its own pool)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            import numba

            memory.pin_thread(cpus)
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="numa-tune")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_bandwidth(cpu_node: Node, mem_node: int, threads: int, nbytes: int, iters: int) -> float:
    """Best-of-`iters` streaming read GB/s: `threads` threads on cpu_node, memory bound to mem_node."""
    kernel = _stream_kernel()
    buf = memory.alloc(nbytes, memory.MPOL_BIND, [mem_node])
    a = buf.array[: nbytes // 32768 * 32768].view(np.uint64).reshape(-1, 4096)  # [rows, 4096]
    a[:] = 1  # first touch

    def measure() -> float:
        kernel(a)  # warm-up (and compile on first use)
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            kernel(a)
            best = min(best, time.perf_counter() - t0)
        return a.nbytes / best / 1e9

    return _in_pinned_thread(cpu_node.cpus[:threads] or cpu_node.cpus, threads, measure)


def random_q4k_blocks(rng: np.random.Generator, shape: tuple[int, ...], n_elements: int) -> np.ndarray:
    """Random valid Q4_K rows: uint8 [*shape, n_elements/256*144], finite small d and dmin."""
    nb = n_elements // Q4_K_BLOCK
    blocks = rng.integers(0, 256, size=(*shape, nb, Q4_K_BYTES), dtype=np.uint8)
    halves = blocks[..., :4].copy().view(np.float16)  # [..., nb, 2]: d, dmin
    halves[...] = rng.uniform(1e-4, 2e-3, size=halves.shape).astype(np.float16)
    blocks[..., :4] = halves.view(np.uint8)
    return blocks.reshape(*shape, nb * Q4_K_BYTES)


def _import_moe() -> tuple[Callable, type] | None:
    try:
        from hybrid_runtime.experts.moe_cpu import ExpertWeights, moe_forward
    except ImportError:
        return None
    return moe_forward, ExpertWeights


def kernel_scaling(node: Node, thread_counts: list[int], n_experts: int, iters: int,
                   seed: int = 0) -> list[dict] | None:
    """moe_forward GB/s (weight bytes read per call) at each thread count; None without moe_cpu."""
    moe = _import_moe()
    if moe is None:
        return None
    moe_forward, ExpertWeights = moe
    rng = np.random.default_rng(seed)
    E, D, F = n_experts, KIMI_D, KIMI_F
    experts = ExpertWeights(
        gate=random_q4k_blocks(rng, (E, F), D), up=random_q4k_blocks(rng, (E, F), D),
        down=random_q4k_blocks(rng, (E, D), F), gate_type=Q4_K_TYPE, up_type=Q4_K_TYPE,
        down_type=Q4_K_TYPE, n_expert=E, n_ff=F, hidden=D,
    )
    weight_bytes = experts.gate.nbytes + experts.up.nbytes + experts.down.nbytes
    x = rng.standard_normal((1, D)).astype(np.float32)  # [T, D]
    K = min(8, E)
    ids = rng.permutation(E)[:K].reshape(1, K).astype(np.int64)  # [T, K]
    w = rng.uniform(0.1, 1.0, (1, K)).astype(np.float32)  # [T, K]
    bytes_read = weight_bytes * K / E

    def measure() -> float:
        moe_forward(x, ids, w, experts)
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            moe_forward(x, ids, w, experts)
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    for t in thread_counts:
        best = _in_pinned_thread(node.cpus[:t], t, measure)
        rows.append({"threads": t, "ms": best * 1e3, "gb_s": bytes_read / best / 1e9})
    return rows


@dataclass(slots=True)
class TuneOptions:
    buffer_mib: int = 1024
    iters: int = 5
    kernel_experts: int = 8
    threads: list[int] | None = None  # thread counts to sweep; default 1..CPUs of the node
    measure: bool = True


def measure_all(topo: Topology, opts: TuneOptions) -> dict:
    """Local bandwidth vs threads per node, cross-node bandwidth, kernel scaling on node 0."""
    nbytes = opts.buffer_mib << 20
    out: dict[str, Any] = {"buffer_mib": opts.buffer_mib, "iters": opts.iters, "local": {}, "cross": {}}
    nodes = topo.compute_nodes()
    for node in nodes:
        counts = _thread_counts(node, opts.threads)
        out["local"][str(node.id)] = [
            {"threads": t, "gb_s": read_bandwidth(node, node.id, t, nbytes, opts.iters)} for t in counts
        ]
    for a in nodes:
        for b in topo.nodes:
            if a.id != b.id and b.mem_total > 0:
                gb = read_bandwidth(a, b.id, len(a.cpus), nbytes, opts.iters)
                out["cross"][f"{a.id}->{b.id}"] = gb
    scaling = kernel_scaling(nodes[0], _thread_counts(nodes[0], opts.threads), opts.kernel_experts, opts.iters)
    out["kernel"] = scaling
    out["kernel_note"] = None if scaling is not None else (
        "hybrid_runtime.experts.moe_cpu is not importable yet: Q4_K kernel scaling skipped")
    return out


def _thread_counts(node: Node, requested: list[int] | None) -> list[int]:
    n = len(node.cpus)
    counts = requested or list(range(1, n + 1))
    return sorted({min(max(1, t), n) for t in counts})


# ---------------------------------------------------------------- planning


def _best_threads(rows: list[dict] | None, default: int, key: str = "gb_s") -> int:
    """Fewest threads that reach 95 % of the best measured figure."""
    if not rows:
        return default
    best = max(r[key] for r in rows)
    return min(r["threads"] for r in rows if r[key] >= 0.95 * best)


def _hugepage_plan(topo: Topology, expert_bytes: int | None) -> dict:
    free_huge = sum(n.hugepage_bytes_free() for n in topo.nodes)
    use_thp = topo.thp in ("always", "madvise")
    advice = ("THP is on: expert buffers are madvise(MADV_HUGEPAGE)d" if use_thp else
              "THP is off: `echo madvise > /sys/kernel/mm/transparent_hugepage/enabled` (root)")
    return {"thp": topo.thp, "use_thp": use_thp, "hugetlb_free_bytes": free_huge, "advice": advice,
            "hugetlb_covers_experts": bool(expert_bytes and free_huge >= expert_bytes)}


def _headroom(topo: Topology, placement: str, expert_bytes: int | None, shares: list[float]) -> list[str]:
    if not expert_bytes:
        return []
    nodes = topo.compute_nodes()
    need = placement_memory(placement, expert_bytes, len(nodes), shares)
    warnings = []
    for i, node in enumerate(nodes):
        if need[i] > node.mem_free:
            warnings.append(f"node {node.id}: {placement} needs {need[i] / 2**30:.1f} GiB of experts, "
                            f"{node.mem_free / 2**30:.1f} GiB free")
    return warnings


def plan(topo: Topology, measured: dict | None, expert_bytes: int | None) -> tuple[NumaConfig, list[str]]:
    """Recommend threads per node and a placement; returns the config and warnings."""
    nodes = topo.compute_nodes()
    local = (measured or {}).get("local", {})
    kernel = (measured or {}).get("kernel")
    threads = {}
    for n in nodes:
        t_bw = _best_threads(local.get(str(n.id)), len(n.cpus))
        t_kernel = _best_threads(kernel, len(n.cpus)) if n is nodes[0] and kernel else 0
        threads[n.id] = min(len(n.cpus), max(t_bw, t_kernel))
    shares = [threads[n.id] for n in nodes]
    placement = "partition"
    warnings = _headroom(topo, placement, expert_bytes, shares)
    if warnings and not _headroom(topo, "interleave", expert_bytes, shares):
        placement, warnings = "interleave", []  # a node cannot hold its share: spread pages evenly
    node_rows = [{"id": n.id, "cpus": n.cpus, "mem_total": n.mem_total, "mem_free": n.mem_free,
                  "distance": topo.distances[topo.nodes.index(n)]} for n in nodes]
    extra = {"expert_bytes": expert_bytes, "partition_shares_of_2048": partition_ranges(KIMI_F, shares)}
    config = NumaConfig(placement=placement, threads_per_node=threads, nodes=node_rows,
                        hugepages=_hugepage_plan(topo, expert_bytes), measured={**(measured or {}), **extra})
    return config, warnings


# ---------------------------------------------------------------- report, plot, CLI


def print_report(topo: Topology, config: NumaConfig, warnings: list[str], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"NUMA topology ({topo.source}, THP {topo.thp})")
    for col in ("node", "cpus", "mem total", "mem free", "huge pages free", "distances"):
        table.add_column(col)
    for i, n in enumerate(topo.nodes):
        huge = ", ".join(f"{k // 1024}M:{f}" for k, (_, f) in sorted(n.hugepages.items())) or "-"
        table.add_row(str(n.id), _cpu_ranges(n.cpus), f"{n.mem_total / 2**30:.1f} GiB",
                      f"{n.mem_free / 2**30:.1f} GiB", huge, " ".join(map(str, topo.distances[i])))
    console.print(table)
    _print_measured(console, config.measured)
    eb = config.measured.get("expert_bytes")
    if eb:
        mem = placement_memory("replicate", eb, len(config.threads_per_node))
        console.print(f"routed experts: {eb / 2**30:.1f} GiB; replicate would need "
                      f"{sum(mem.values()) / 2**30:.1f} GiB in all")
    console.print(f"[bold]recommended[/bold]: placement [cyan]{config.placement}[/cyan], threads per node "
                  f"{config.threads_per_node}, shares of F=2048 {config.measured['partition_shares_of_2048']}")
    console.print(f"huge pages: {config.hugepages['advice']}")
    for w in warnings:
        console.print(f"[yellow]warning[/yellow]: {w}")


def _print_measured(console: Any, m: dict) -> None:
    for node, rows in m.get("local", {}).items():
        figures = ", ".join(f"{r['threads']}t {r['gb_s']:.1f}" for r in rows)
        console.print(f"node {node} local read GB/s: {figures}")
    for pair, gb in m.get("cross", {}).items():
        console.print(f"cross-node read {pair}: {gb:.1f} GB/s")
    if m.get("kernel"):
        figures = ", ".join(f"{r['threads']}t {r['gb_s']:.1f} GB/s ({r['ms']:.2f} ms)" for r in m["kernel"])
        console.print(f"Q4_K MoE kernel (D=7168, F=2048): {figures}")
    if m.get("kernel_note"):
        console.print(f"[yellow]note[/yellow]: {m['kernel_note']}")


def _cpu_ranges(cpus: list[int]) -> str:
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts) or "-"


def write_plot(measured: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for node, rows in measured.get("local", {}).items():
        ax.plot([r["threads"] for r in rows], [r["gb_s"] for r in rows], "o-", label=f"read, node {node}")
    if measured.get("kernel"):
        rows = measured["kernel"]
        ax.plot([r["threads"] for r in rows], [r["gb_s"] for r in rows], "s--", label="Q4_K MoE kernel")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("threads")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_tune(out: Path | None, model: Path | None, opts: TuneOptions, plot_path: Path | None,
             sys_root: str = "/sys") -> NumaConfig:
    """Discover, measure (unless opts.measure is False), plan, report and write the config."""
    if out and not Path(out).resolve().parent.is_dir():
        raise HybridError(f"Cannot write the NUMA config to {out}: its folder does not exist.")
    topo = discover(sys_root)
    expert_bytes = model_expert_bytes(model) if model else None
    measured = measure_all(topo, opts) if opts.measure else {"dry_run": True}
    config, warnings = plan(topo, measured, expert_bytes)
    print_report(topo, config, warnings)
    if out:
        save_numa_config(config, out)
    if plot_path and opts.measure:
        write_plot(measured, plot_path)
    return config


def numa_tune_command(
    model: Optional[Path] = typer.Option(None, "--model", help="GGUF file: check memory headroom for its experts"),
    out: Optional[Path] = typer.Option(Path("numa.json"), "--out", help="where to write the config"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan from the topology alone, measure nothing"),
    threads: Optional[str] = typer.Option(None, "--threads", help="thread counts to sweep, e.g. 1,2,4,8"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write bandwidth-vs-threads PNG"),
    buffer_mib: int = typer.Option(1024, "--buffer-mib", help="read-bandwidth buffer size"),
    iters: int = typer.Option(5, "--iters", help="timed repetitions (best is kept)"),
    kernel_experts: int = typer.Option(8, "--kernel-experts", help="experts in the kernel-scaling test"),
) -> None:
    """Measure NUMA bandwidth and MoE kernel scaling; write a --numa-config file."""
    try:
        counts = [int(t) for t in threads.split(",")] if threads else None
    except ValueError:
        raise typer.BadParameter(f"--threads takes comma-separated integers, got {threads!r}") from None
    opts = TuneOptions(buffer_mib=buffer_mib, iters=iters, kernel_experts=kernel_experts,
                       threads=counts, measure=not dry_run)
    try:
        run_tune(out, model, opts, plot)
    except HybridError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def _make_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(numa_tune_command)  # mount elsewhere with app.command("numa-tune")(numa_tune_command)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/numa_tune.py; returns the exit status (usage errors print help)."""
    try:
        _make_app()(args=argv, prog_name="numa-tune")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
