import json

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.quants import dequantize

from hybrid_runtime.errors import HybridError
from hybrid_runtime.numa.topology import Node, Topology, discover
from hybrid_runtime.numa.tune import (
    Q4_K_TYPE, NumaConfig, load_numa_config, main, model_expert_bytes, plan, random_q4k_blocks,
    read_bandwidth, save_numa_config, write_plot,
)


def test_dry_run_writes_config_that_loads(tmp_path):
    out = tmp_path / "numa.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    config = load_numa_config(out)
    topo = discover()
    assert config.version == 1 and config.placement == "partition"
    assert set(config.threads_per_node) == {n.id for n in topo.compute_nodes()}
    assert all(1 <= t <= len(topo.node(i).cpus) for i, t in config.threads_per_node.items())
    raw = json.loads(out.read_text())
    assert list(raw)[:3] == ["version", "placement", "threads_per_node"]
    assert raw["measured"]["dry_run"] is True


def test_roundtrip_random_config(tmp_path):
    rng = np.random.default_rng()
    threads = {int(i): int(rng.integers(0, 64)) for i in rng.permutation(8)[:3]}
    config = NumaConfig("replicate", threads, nodes=[{"id": 0}], measured={"x": float(rng.random())})
    save_numa_config(config, tmp_path / "c.json")
    back = load_numa_config(tmp_path / "c.json")
    assert back.threads_per_node == threads and back.placement == "replicate" and back.measured == config.measured


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", '{"version": 2, "placement": "partition", "threads_per_node": {}}',
    '{"version": 1, "threads_per_node": {"0": 4}}', '{"version": 1, "placement": "partition"}',
    '{"version": 1, "placement": "everywhere", "threads_per_node": {"0": 4}}',
    '{"version": 1, "placement": "partition", "threads_per_node": {"zero": 4}}',
    '{"version": 1, "placement": "partition", "threads_per_node": {"0": -1}}', "",
])
def test_corrupt_config_is_a_hybrid_error(tmp_path, text):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(HybridError) as e:
        load_numa_config(p)
    assert str(p) in str(e.value)


def test_missing_and_binary_config(tmp_path):
    with pytest.raises(HybridError, match="does not exist"):
        load_numa_config(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(HybridError):
        load_numa_config(tmp_path / "bin.json")


def test_model_expert_bytes(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    sizes = {"blk.1.ffn_gate_exps.weight": (2, 8, 32), "blk.1.ffn_down_exps.weight": (2, 32, 8),
             "blk.1.attn_q_a.weight": (16, 32), "token_embd.weight": (10, 32)}
    for name, shape in sizes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert model_expert_bytes(path) == 4 * (2 * 8 * 32 + 2 * 32 * 8)
    with pytest.raises(HybridError):
        model_expert_bytes(tmp_path / "missing.gguf")


def test_random_q4k_blocks_are_valid():
    rows = random_q4k_blocks(np.random.default_rng(), (3, 4), 512)
    assert rows.shape == (3, 4, 2 * 144) and rows.dtype == np.uint8
    values = dequantize(rows, Q4_K_TYPE)
    assert values.shape == (3, 4, 512) and np.isfinite(values).all() and values.std() > 0


def two_nodes(free_gib=(100, 100)) -> Topology:
    nodes = [Node(i, list(range(8 * i, 8 * i + 8)), 128 << 30, f << 30) for i, f in enumerate(free_gib)]
    return Topology(nodes=nodes, distances=[[10, 21], [21, 10]], thp="never", source="test")


def test_plan_picks_fewest_threads_near_best():
    measured = {"local": {"0": [{"threads": t, "gb_s": g} for t, g in [(1, 20), (2, 38), (4, 60), (8, 61)]],
                          "1": [{"threads": t, "gb_s": g} for t, g in [(1, 20), (2, 38), (4, 50), (8, 70)]]}}
    config, warnings = plan(two_nodes(), measured, expert_bytes=150 << 30)
    assert config.threads_per_node == {0: 4, 1: 8}
    assert config.placement == "partition" and warnings == []
    assert config.measured["partition_shares_of_2048"] == [(0, 768), (768, 2048)]
    assert "madvise" in config.hugepages["advice"] and config.hugepages["use_thp"] is False


def test_plan_headroom_falls_back_to_interleave_then_warns():
    # node 0 saturates at 2 threads, node 1 at 8: partition gives node 1 4/5 of 160 GiB > 100 free
    measured = {"local": {"0": [{"threads": 2, "gb_s": 50}, {"threads": 8, "gb_s": 50}],
                          "1": [{"threads": 2, "gb_s": 20}, {"threads": 8, "gb_s": 50}]}}
    config, warnings = plan(two_nodes((100, 100)), measured, expert_bytes=160 << 30)
    assert config.threads_per_node == {0: 2, 1: 8}
    assert config.placement == "interleave" and warnings == []
    config, warnings = plan(two_nodes((100, 100)), measured, expert_bytes=100 << 30)
    assert config.placement == "partition" and warnings == []
    config, warnings = plan(two_nodes((50, 50)), None, expert_bytes=160 << 30)
    assert config.placement == "partition" and len(warnings) == 2 and "GiB" in warnings[0]


def test_read_bandwidth_and_plot_small(tmp_path):
    node = discover().compute_nodes()[0]
    gb = read_bandwidth(node, node.id, 1, 4 << 20, iters=1)
    assert 0 < gb < 10_000
    write_plot({"local": {"0": [{"threads": 1, "gb_s": gb}]}}, tmp_path / "bw.png")
    assert (tmp_path / "bw.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_threads(tmp_path, capsys):
    assert main(["--dry-run", "--threads", "1,x", "--out", str(tmp_path / "c.json")]) != 0
    assert not (tmp_path / "c.json").exists()


def test_cli_unwritable_out_is_a_clean_error(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path / "missing" / "c.json")]) == 1
    assert "folder does not exist" in capsys.readouterr().err
