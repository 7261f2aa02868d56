"""NUMA topology of this machine, read from /sys (or psutil where /sys has no node tree)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

_MEMINFO_RE = re.compile(r"Node\s+\d+\s+(\w+):\s+(\d+)(?:\s+kB)?")


@dataclass(slots=True)
class Node:
    """One NUMA node: the CPUs this process may use on it, its memory and huge pages."""

    id: int
    cpus: list[int]
    mem_total: int  # bytes
    mem_free: int  # bytes
    hugepages: dict[int, tuple[int, int]] = field(default_factory=dict)  # size_kb -> (total, free)

    def hugepage_bytes_free(self) -> int:
        return sum(size_kb * 1024 * free for size_kb, (_, free) in self.hugepages.items())


@dataclass(slots=True)
class Topology:
    """Nodes, the distance matrix (10 = local) and the transparent-huge-page mode."""

    nodes: list[Node]
    distances: list[list[int]]
    thp: str  # "always" | "madvise" | "never" | "unknown"
    source: str  # "sysfs" | "psutil"

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def cpus(self) -> list[int]:
        return sorted(c for n in self.nodes for c in n.cpus)

    def compute_nodes(self) -> list[Node]:
        """Nodes that have at least one CPU this process may run on."""
        return [n for n in self.nodes if n.cpus]

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_cpulist(text: str) -> list[int]:
    """'0-27,56-83' -> [0, ..., 27, 56, ..., 83]; an empty string gives []."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            step = 1
            if ":" in hi:  # "0-15:2" stride form (rare)
                hi, step_text = hi.split(":", 1)
                step = int(step_text.split("/")[0])
            cpus.extend(range(int(lo), int(hi) + 1, step))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


def parse_meminfo(text: str) -> dict[str, int]:
    """Per-node meminfo lines 'Node 0 MemTotal:  123 kB' -> {'MemTotal': bytes, ...}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _MEMINFO_RE.match(line.strip())
        if m:
            key, value = m.group(1), int(m.group(2))
            out[key] = value * 1024 if "kB" in line else value
    return out


def parse_thp(text: str) -> str:
    """'always [madvise] never' -> 'madvise'."""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def _read_hugepages(node_dir: Path) -> dict[int, tuple[int, int]]:
    pages: dict[int, tuple[int, int]] = {}
    for d in sorted(node_dir.glob("hugepages/hugepages-*kB")):
        size_kb = int(d.name[len("hugepages-") : -len("kB")])
        total = int(_read(d / "nr_hugepages", "0").strip() or 0)
        free = int(_read(d / "free_hugepages", "0").strip() or 0)
        pages[size_kb] = (total, free)
    return pages


def _read_node(node_dir: Path, allowed: set[int] | None) -> Node:
    cpus = parse_cpulist(_read(node_dir / "cpulist"))
    if allowed is not None:
        cpus = [c for c in cpus if c in allowed]
    mem = parse_meminfo(_read(node_dir / "meminfo"))
    return Node(
        id=int(node_dir.name[4:]),
        cpus=cpus,
        mem_total=mem.get("MemTotal", 0),
        mem_free=mem.get("MemFree", 0),
        hugepages=_read_hugepages(node_dir),
    )


def _read_distances(node_dirs: list[Path]) -> list[list[int]]:
    # each row lists the distance to every online node, in node order
    n = len(node_dirs)
    rows = []
    for i, d in enumerate(node_dirs):
        values = [int(v) for v in _read(d / "distance").split()]
        if len(values) != n:
            values = [10 if j == i else 20 for j in range(n)]
        rows.append(values)
    return rows


def _node_dirs(node_root: Path) -> list[Path]:
    dirs = [d for d in node_root.glob("node*") if re.fullmatch(r"node\d+", d.name)]
    return sorted(dirs, key=lambda d: int(d.name[4:]))


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _psutil_topology(allowed: set[int] | None, thp: str) -> Topology:
    cpus = sorted(allowed) if allowed else list(range(psutil.cpu_count() or 1))
    vm = psutil.virtual_memory()
    node = Node(id=0, cpus=cpus, mem_total=vm.total, mem_free=vm.available)
    return Topology(nodes=[node], distances=[[10]], thp=thp, source="psutil")


def discover(sys_root: str | os.PathLike = "/sys", allowed_cpus: set[int] | None = None) -> Topology:
    """Read the NUMA topology under `sys_root`; CPUs are limited to this process's affinity.

    `allowed_cpus` overrides os.sched_getaffinity (tests). Without a node tree under
    sys_root (non-Linux, some containers) the result is one node holding every usable CPU.
    """
    root = Path(sys_root)
    allowed = allowed_cpus if allowed_cpus is not None else _allowed_cpus()
    thp = parse_thp(_read(root / "kernel/mm/transparent_hugepage/enabled"))
    node_dirs = _node_dirs(root / "devices/system/node")
    if not node_dirs:
        return _psutil_topology(allowed, thp)
    nodes = [_read_node(d, allowed) for d in node_dirs]
    return Topology(nodes=nodes, distances=_read_distances(node_dirs), thp=thp, source="sysfs")
