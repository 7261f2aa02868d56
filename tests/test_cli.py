"""The commands as a user runs them: real processes, parsed outputs, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "hybrid_runtime.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.fixture(scope="module")
def model(tiny):
    return tiny("kimi-k2-tiny", "Q4_K_M")[0]


def test_inspect_json_describes_the_file(model):
    r = run("inspect", model, "--json", "--gpu-mem", "2GiB")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["architecture"] == "deepseek2" and info["config"]["n_expert"] == 16
    assert info["routed_expert_bytes"] > 0 and info["plan"]["gpu_budget"] == 2 << 30


def test_generate_greedy_is_deterministic_and_reports_speed(model):
    a = run("generate", model, "-p", "Once upon a time", "-n", "12", "--temp", "0", "--threads", "1")
    b = run("generate", model, "-p", "Once upon a time", "-n", "12", "--temp", "0", "--threads", "1")
    assert a.returncode == b.returncode == 0
    text = lambda r: r.stdout.split("[ Prompt:")[0]  # noqa: E731
    assert text(a) == text(b) and "t/s" in a.stdout and "placement:" in a.stdout


def test_verify_agrees_with_llama_cpp(model):
    r = run("verify", model, "--threads", "1")
    assert r.returncode == 0 and "agreement OK" in r.stdout


def test_bench_decode_json(model):
    r = run("bench", "decode", model, "--n-gen", "4", "--threads", "1", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)["decode"]["ours"]
    assert d["tokens_per_s"] > 0 and 0 <= d["overhead_per_layer_s"] <= d["per_layer_s"]


@pytest.mark.parametrize("args", [["generate"], ["generate", "x.gguf", "-p", "hi", "--temp", "abc"],
                                  ["inspect", "x.gguf", "--bogus"], ["bench", "nothing"]])
def test_usage_errors_exit_2_without_traceback(args):
    r = run(*args)
    assert r.returncode == 2


def test_numa_tune_dry_run_writes_a_config(tmp_path):
    out = tmp_path / "numa.json"
    r = run("numa-tune", "--dry-run", "--out", out)
    assert r.returncode == 0 and json.loads(out.read_text())["version"] == 1
