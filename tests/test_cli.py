"""The commands as a user runs them: real processes, parsed outputs, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
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
    out = json.loads(r.stdout)["decode"]
    d = out["ours"]
    assert d["tokens_per_s"] > 0 and 0 <= d["overhead_per_layer_s"] <= d["per_layer_s"]
    # bytes per step, counted independently with gguf's reader: all tensors but the token embedding
    # (gathered, not read whole, unless the head is tied to it), the routed experts at K / E
    from gguf import GGUFReader

    reader = GGUFReader(model)
    field = lambda key: int(reader.fields[key].parts[-1][0])  # noqa: E731
    arch = "deepseek2"
    k, e = field(f"{arch}.expert_used_count"), field(f"{arch}.expert_count")
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    expect = sum(n * k // e if "_exps" in name else n for name, n in names.items() if name != "token_embd.weight")
    if "output.weight" not in names:
        expect += names["token_embd.weight"]
    b = out["bandwidth"]
    assert b["bytes_per_step"] == expect
    assert b["read_gbs_before"] > 0 and b["read_gbs_after"] > 0
    assert abs(b["effective_gbs"] - expect / d["step_s"] / 1e9) < 1e-6 * b["effective_gbs"]


@pytest.mark.parametrize("args", [["generate"], ["generate", "x.gguf", "-p", "hi", "--temp", "abc"],
                                  ["inspect", "x.gguf", "--bogus"], ["bench", "nothing"]])
def test_usage_errors_exit_2_without_traceback(args):
    r = run(*args)
    assert r.returncode == 2


def test_numa_tune_dry_run_writes_a_config(tmp_path):
    out = tmp_path / "numa.json"
    r = run("numa-tune", "--dry-run", "--out", out)
    assert r.returncode == 0 and json.loads(out.read_text())["version"] == 1


def model_config(path):
    from hybrid_runtime.models import get_architecture
    from hybrid_runtime.weights.gguf_file import GGUFModelFile

    gf = GGUFModelFile(path)
    return gf, get_architecture(gf.architecture).read_config(gf)


def hybrid_args(path, slots: int = 4, n_ctx: int = 256) -> list[str]:
    """--device hybrid with a GPU budget for the non-expert weights and a few expert-cache slots."""
    from hybrid_runtime.plan import GIB, make_plan

    gf, cfg = model_config(path)
    base = make_plan(gf.tensors, cfg, gpu_mem=64 * GIB, ram=64 * GIB, cpu_moe=True, n_ctx=n_ctx,
                     overrides=["token_embd=CPU"])
    return ["--device", "hybrid", "--gpu-mem", str(base.gpu_total + slots * base.slot_bytes), "--n-ctx", str(n_ctx),
            "-ot", "token_embd=CPU"]


def random_prompt() -> str:
    rng = np.random.default_rng()
    return " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away"], 6))


def test_generate_records_routing_and_writes_the_profile(model, tmp_path):
    record, profile = tmp_path / "routing.jsonl", tmp_path / "profile.json"
    r = run("generate", model, "-p", random_prompt(), "-n", "6", "--threads", "1", *hybrid_args(model),
            "--record-routing", record, "--expert-profile", profile, "--speculative-prefetch")
    assert r.returncode == 0, r.stderr
    assert "no effect" not in r.stderr and "[ Prompt:" in r.stdout
    _, cfg = model_config(model)
    lines = record.read_text().splitlines()
    assert lines
    tokens: dict[int, int] = {}
    for line in lines:
        rec = json.loads(line)
        ids = np.asarray(rec["ids"])
        assert cfg.is_moe_layer(rec["layer"]) and ids.ndim == 2 and ids.shape[1] == cfg.n_expert_used
        assert ((0 <= ids) & (ids < cfg.n_expert)).all()
        tokens[rec["layer"]] = tokens.get(rec["layer"], 0) + ids.shape[0]
    assert len(set(tokens.values())) == 1  # every MoE layer saw every token
    saved = json.loads(profile.read_text())
    assert saved["n_expert"] == cfg.n_expert and saved["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json", "routing.jsonl"]


def test_chat_single_turn_writes_the_profile_when_it_ends(model, tmp_path):
    profile = tmp_path / "profile.json"
    r = run("chat", model, "--single-turn", random_prompt(), "--threads", "1", *hybrid_args(model, n_ctx=96),
            "--expert-profile", profile)
    assert r.returncode == 0, r.stderr
    saved = json.loads(profile.read_text())
    assert saved["tokens"] and all(n > 0 for n in saved["tokens"].values())


def test_gpu_path_flags_on_the_cpu_path_only_note(model, tmp_path):
    record = tmp_path / "routing.jsonl"
    r = run("generate", model, "-p", random_prompt(), "-n", "2", "--threads", "1", "--device", "cpu",
            "--record-routing", record, "--cuda-graphs")
    assert r.returncode == 0 and "[ Prompt:" in r.stdout
    notes = [l for l in r.stderr.splitlines() if "no effect" in l]
    assert len(notes) == 1 and "--record-routing" in notes[0] and "--cuda-graphs" in notes[0]
    assert not record.exists()


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flag", ["--expert-profile", "--record-routing"])
def test_output_file_in_a_missing_directory_is_rejected(model, tmp_path, command, flag):
    args = {"generate": ["-p", "hi", "-n", "1"], "chat": ["--single-turn", "hi"], "serve": ["--port", "0"]}[command]
    missing = tmp_path / "no-such-dir" / "file.json"
    r = run(command, model, *args, "--threads", "1", flag, missing, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0] and str(missing.parent) in errors[0]  # one line
    assert not missing.parent.exists()


def test_garbage_profile_is_rejected(model, tmp_path):
    bad = tmp_path / "garbage.json"
    bad.write_bytes(np.random.default_rng().integers(0, 256, 64, dtype=np.uint8).tobytes())
    r = run("generate", model, "-p", "hi", "-n", "1", "--threads", "1", "--expert-profile", bad)
    assert r.returncode == 1 and "garbage.json" in r.stderr and "error:" in r.stderr


COMMANDS_ON_A_FILE = {
    "inspect": [], "generate": ["-p", "hi", "-n", "1"], "chat": ["--single-turn", "hi"], "serve": ["--port", "0"],
    "verify": [], "bench decode": ["--n-gen", "1"], "numa-tune": ["--dry-run"], "perplexity": ["--file", __file__],
}


def _error_lines(r) -> list[str]:
    return [l for l in r.stderr.splitlines() if "error" in l.lower()]


@pytest.mark.parametrize("command", sorted(COMMANDS_ON_A_FILE))
def test_every_command_on_a_corrupt_file_is_one_line(model, tmp_path, command):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(model.read_bytes()[:100_000])  # a truncated download: header whole, data cut
    if command == "numa-tune":
        r = run(command, "--model", bad, "--out", tmp_path / "numa.json", "--dry-run")
    elif command == "inspect":
        r = run(command, bad)
    else:
        r = run(*command.split(), bad, *COMMANDS_ON_A_FILE[command], "--threads", "1", timeout=120)
    assert r.returncode != 0
    errors = _error_lines(r)
    assert len(errors) == 1 and "runs past the end of the file" in errors[0] and str(bad) in errors[0], r.stderr


@pytest.mark.parametrize("args", [["numa-tune", "--bogus"], ["numa-tune", "--out", "/no/such/dir/numa.json", "--dry-run"],
                                  ["chat", "MODEL", "--temp", "hot"], ["serve", "MODEL", "--port", "70000"],
                                  ["verify", "MODEL", "--bogus"], ["bench", "decode", "MODEL", "--threads", "x"],
                                  ["inspect", "MODEL", "--n-cpu-moe", "-3", "--gpu-mem", "1GiB"],
                                  ["generate", "MODEL", "-p", "hi", "--top-p", "7"],
                                  ["perplexity", "MODEL", "--file", __file__, "--n-ctx", "x"]])
def test_every_command_with_a_bad_flag_is_one_line(model, args):
    r = run(*[model if a == "MODEL" else a for a in args], timeout=120)
    assert r.returncode != 0
    assert len(_error_lines(r)) == 1, r.stderr


def test_an_unexpected_error_is_one_line_unless_debug(model, monkeypatch):
    from typer.testing import CliRunner

    from hybrid_runtime import cli
    from hybrid_runtime.weights import model_file

    def broken(path):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(model_file, "open_model_file", broken)
    runner = CliRunner()
    r = runner.invoke(cli.app, ["inspect", str(model)])
    assert r.exit_code == 1 and "internal error (RuntimeError: boom); run with --debug" in r.output
    assert "second line" not in r.output and "Traceback" not in r.output
    r = runner.invoke(cli.app, ["--debug", "inspect", str(model)])
    assert isinstance(r.exception, RuntimeError)


def test_generate_json_schema_output_validates(model, tmp_path):
    import random

    import jsonschema

    rng = random.Random()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["x", "y", rng.choice("abc")]}},
              "required": rng.sample(["n", "s"], rng.randint(1, 2)), "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = run("generate", model, "-p", "JSON please:", "-n", "24", "--temp", "1.0", "--seed", rng.randrange(1000),
            "--json-schema", path, "--threads", "1")
    assert r.returncode == 0, r.stderr
    line = r.stdout.split("[ Prompt:")[0].strip().splitlines()[-1]
    jsonschema.validate(json.loads(line), schema)


@pytest.mark.parametrize("content, n, message", [
    ("{not json", "8", "is not valid JSON"), ('{"type": 5}', "8", "type must be a string"),
    ('{"type": "object", "required": ["abc"], "properties": {"abc": {"type": "string"}}}', "2", "too few"),
])
def test_generate_bad_json_schema_is_one_line(model, tmp_path, content, n, message):
    path = tmp_path / "schema.json"
    path.write_text(content)
    r = run("generate", model, "-p", "x", "-n", n, "--json-schema", path, "--threads", "1")
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and message in errors[0], r.stderr
