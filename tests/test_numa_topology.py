from pathlib import Path

import pytest

from hybrid_runtime.numa.topology import discover, parse_cpulist, parse_meminfo, parse_thp


def write_sys(root: Path, nodes: list[dict], thp: str = "always [madvise] never") -> Path:
    """A synthetic /sys tree: nodes are dicts with cpulist, mem_kb, free_kb, distance, huge."""
    (root / "kernel/mm/transparent_hugepage").mkdir(parents=True)
    (root / "kernel/mm/transparent_hugepage/enabled").write_text(thp + "\n")
    for i, n in enumerate(nodes):
        d = root / f"devices/system/node/node{i}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(n["cpulist"] + "\n")
        (d / "distance").write_text(n["distance"] + "\n")
        (d / "meminfo").write_text(
            f"Node {i} MemTotal:       {n['mem_kb']} kB\n"
            f"Node {i} MemFree:        {n['free_kb']} kB\n"
            f"Node {i} MemUsed:        {n['mem_kb'] - n['free_kb']} kB\n"
            f"Node {i} HugePages_Total:     0\n"
        )
        for size_kb, (total, free) in n.get("huge", {}).items():
            h = d / f"hugepages/hugepages-{size_kb}kB"
            h.mkdir(parents=True)
            (h / "nr_hugepages").write_text(f"{total}\n")
            (h / "free_hugepages").write_text(f"{free}\n")
            (h / "surplus_hugepages").write_text("0\n")
    (root / "devices/system/node/online").write_text(f"0-{len(nodes) - 1}\n")
    return root


GIB_KB = 1 << 20
ALL = set(range(224))


def two_socket() -> list[dict]:
    return [
        dict(cpulist="0-27,56-83", mem_kb=256 * GIB_KB, free_kb=250 * GIB_KB, distance="10 21",
             huge={2048: (1024, 1000), 1048576: (4, 4)}),
        dict(cpulist="28-55,84-111", mem_kb=256 * GIB_KB, free_kb=240 * GIB_KB, distance="21 10",
             huge={2048: (1024, 1024), 1048576: (0, 0)}),
    ]


def snc2_four_node() -> list[dict]:
    rows = ["10 12 21 21", "12 10 21 21", "21 21 10 12", "21 21 12 10"]
    cpus = ["0-13,56-69", "14-27,70-83", "28-41,84-97", "42-55,98-111"]
    return [dict(cpulist=c, mem_kb=128 * GIB_KB, free_kb=120 * GIB_KB, distance=r) for c, r in zip(cpus, rows)]


def test_parse_helpers():
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("\n") == []
    assert parse_cpulist("0-6:2") == [0, 2, 4, 6]
    assert parse_meminfo("Node 1 MemTotal:  100 kB\nNode 1 HugePages_Free: 3\n") == {
        "MemTotal": 102400, "HugePages_Free": 3}
    assert parse_thp("[always] madvise never") == "always"
    assert parse_thp("always madvise [never]") == "never"
    assert parse_thp("") == "unknown"


def test_one_node(tmp_path):
    root = write_sys(tmp_path, [dict(cpulist="0-7", mem_kb=64 * GIB_KB, free_kb=60 * GIB_KB, distance="10")],
                     thp="[always] madvise never")
    topo = discover(root, allowed_cpus=ALL)
    assert topo.source == "sysfs" and topo.n_nodes == 1 and topo.thp == "always"
    assert topo.nodes[0].cpus == list(range(8))
    assert topo.nodes[0].mem_total == 64 << 30 and topo.nodes[0].mem_free == 60 << 30
    assert topo.distances == [[10]]


def test_two_socket(tmp_path):
    topo = discover(write_sys(tmp_path, two_socket()), allowed_cpus=ALL)
    assert [n.id for n in topo.nodes] == [0, 1]
    assert topo.nodes[0].cpus == list(range(0, 28)) + list(range(56, 84))
    assert topo.nodes[1].cpus == list(range(28, 56)) + list(range(84, 112))
    assert topo.distances == [[10, 21], [21, 10]]
    assert topo.nodes[0].hugepages == {2048: (1024, 1000), 1048576: (4, 4)}
    assert topo.nodes[0].hugepage_bytes_free() == 1000 * (2 << 20) + 4 * (1 << 30)
    assert topo.thp == "madvise" and len(topo.cpus) == 112


def test_snc2_four_nodes(tmp_path):
    topo = discover(write_sys(tmp_path, snc2_four_node()), allowed_cpus=ALL)
    assert topo.n_nodes == 4
    assert topo.distances[0] == [10, 12, 21, 21] and topo.distances[3] == [21, 21, 12, 10]
    assert topo.nodes[2].cpus == list(range(28, 42)) + list(range(84, 98))
    assert sorted(topo.cpus) == list(range(112))
    assert all(n.mem_total == 128 << 30 for n in topo.nodes)


def test_affinity_limits_cpus(tmp_path):
    # a container allowed only part of socket 0: socket 1 keeps its memory but has no CPU
    topo = discover(write_sys(tmp_path, two_socket()), allowed_cpus={2, 3, 60, 100})
    assert topo.nodes[0].cpus == [2, 3, 60]
    assert topo.nodes[1].cpus == [100]
    topo = discover(write_sys(tmp_path / "b", two_socket()), allowed_cpus={2, 3})
    assert [n.id for n in topo.compute_nodes()] == [0]
    assert topo.n_nodes == 2


def test_fallback_without_node_tree(tmp_path):
    topo = discover(tmp_path, allowed_cpus={0, 1, 5})
    assert topo.source == "psutil" and topo.n_nodes == 1 and topo.thp == "unknown"
    assert topo.nodes[0].cpus == [0, 1, 5] and topo.nodes[0].mem_total > 0
    assert topo.distances == [[10]]


def test_this_machine():
    topo = discover()
    assert topo.n_nodes >= 1
    assert set(topo.cpus) <= set(__import__("os").sched_getaffinity(0))
    assert len(topo.distances) == topo.n_nodes


@pytest.mark.parametrize("bad", ["10 21 30", ""])
def test_malformed_distance_row_falls_back(tmp_path, bad):
    nodes = two_socket()
    nodes[0]["distance"] = bad
    topo = discover(write_sys(tmp_path, nodes), allowed_cpus=ALL)
    assert topo.distances[0] == [10, 20] and topo.distances[1] == [21, 10]
