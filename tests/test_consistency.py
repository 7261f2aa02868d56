"""Metadata against tensors (weights/consistency.py) and the shared open path (weights/model_file.py):
files that contradict themselves are refused by load() and by inspect alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hybrid_runtime as hr
from gguf_edit import patched, rewrite, tensor_info
from hybrid_runtime.errors import ModelFormatError
from hybrid_runtime.weights.model_file import open_model_file

K = "deepseek2."
CASES = {  # name -> (rewrite arguments, expected message)
    "expert count": (dict(overrides={K + "expert_count": 8}), "ffn_gate_inp.weight has shape .* expert_count"),
    "head count": (dict(overrides={K + "attention.head_count": 8}), "attn_.* has shape"),
    "kv_lora rank": (dict(overrides={K + "attention.kv_lora_rank": 64}), "attn_kv_a.* has shape"),
    "q_lora rank": (dict(overrides={K + "attention.q_lora_rank": 128}), "attn_q_a.* has shape"),
    "vocabulary": (dict(overrides={K + "vocab_size": 4096}), "token_embd.weight has shape .* vocabulary"),
    "expert width": (dict(overrides={K + "expert_feed_forward_length": 512}), "_exps.weight has shape"),
    "hidden size": (dict(overrides={K + "embedding_length": 512}), "has shape"),
    "layer count": (dict(overrides={K + "block_count": 4}), "blk.3.* is missing"),
    "missing tensor": (dict(drop_tensors={"blk.1.ffn_down_exps.weight"}), "blk.1.ffn_down_exps.weight, which deepseek2 needs, is missing"),
    "missing key": (dict(drop_keys={K + "attention.kv_lora_rank"}), "kv_lora_rank is missing"),
    "key of the wrong type": (dict(drop_keys={K + "block_count"}, add=lambda w: w.add_string(K + "block_count", "three")),
                              "wrong type or value"),
    "array for a number": (dict(drop_keys={K + "expert_count"}, add=lambda w: w.add_array(K + "expert_count", [16, 16])),
                           "wrong type or value"),
    "absurd layer count": (dict(overrides={K + "block_count": 1 << 30}), "more than the file's"),
    "zero heads": (dict(overrides={K + "attention.head_count": 0}), "invalid n_head"),
    "more tokens than rows": (dict(overrides={K + "vocab_size": 1024}), "has shape|tokens"),
}


@pytest.fixture(scope="module")
def source(tiny):
    return tiny("kimi-k2-tiny", "Q4_K_M")[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_that_contradicts_the_tensors_is_refused(source, tmp_path, case):
    kwargs, match = CASES[case]
    bad = rewrite(source, tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelFormatError, match=match) as e:
        open_model_file(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ModelFormatError, match=match):
        hr.load(bad)


def test_an_unchanged_rewrite_is_accepted(source, tmp_path):
    """The rewriting itself breaks nothing: the cases above fail for their change alone."""
    same = rewrite(source, tmp_path / "same.gguf")
    gf, _, cfg = open_model_file(same)
    assert cfg.n_expert == 16 and len(gf.tensors) == len(open_model_file(source)[0].tensors)


def _overlapping(source, tmp_path):
    data = source.read_bytes()
    _, _, _, offset, offset_pos = tensor_info(data, "blk.1.ffn_up_exps.weight")
    bad = tmp_path / "overlap.gguf"
    bad.write_bytes(patched(data, offset_pos, "Q", offset - 4096))
    return bad


@pytest.mark.parametrize("kind", ["overlapping data", "expert count", "missing tensor"])
def test_inspect_refuses_what_load_refuses(source, tmp_path, kind):
    """The three files a new user found accepted by `inspect` (and the expert one by load())."""
    bad = _overlapping(source, tmp_path) if kind == "overlapping data" else rewrite(source, tmp_path / "b.gguf", **CASES[kind][0])
    with pytest.raises(ModelFormatError):
        hr.load(bad)
    r = subprocess.run([sys.executable, "-m", "hybrid_runtime.cli", "inspect", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
