"""The NUMA path end to end on this machine: numa-tune writes a config, the runtime uses it, and the
pinned, partitioned experts give the same logits as the plain path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime.errors import HybridError
from hybrid_runtime.numa.tune import main as numa_tune


@pytest.fixture(scope="module")
def numa_config(tmp_path_factory):
    out = tmp_path_factory.mktemp("numa") / "numa.json"
    assert numa_tune(["--dry-run", "--out", str(out)]) == 0
    return out


def test_runtime_uses_the_tuned_config_and_matches_the_plain_path(tiny, numa_config):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    plain, pinned = hr.load(path, compiled=False), hr.load(path, numa_config=str(numa_config))  # both the torch model
    assert "NUMA" in pinned.placement_summary()
    report = pinned.memory_report()
    assert report and "node 0" in report[1]
    toks = np.random.default_rng().integers(0, 2000, 24).tolist()
    np.testing.assert_allclose(pinned.logits(toks), plain.logits(toks), rtol=0, atol=1e-5)


def test_corrupt_numa_config_is_one_clear_error(tiny, tmp_path):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    bad = tmp_path / "numa.json"
    bad.write_text("{not json")
    with pytest.raises(HybridError, match="numa"):
        hr.load(path, numa_config=str(bad))
    r = subprocess.run([sys.executable, "-m", "hybrid_runtime.cli", "generate", str(path), "-p", "hi",
                        "--numa-config", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
