"""The GGUF loader: zero-copy views, split files, and hostile input (one clear error, never a crash)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime.errors import HybridError, ModelFormatError, UnsupportedModelError
from hybrid_runtime.oracle import llama_cpp_logits
from hybrid_runtime.synth.split import split_gguf
from hybrid_runtime.weights.gguf_file import GGUFModelFile


def test_tensors_are_zero_copy_views_of_the_mapped_file(tiny):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    gf = GGUFModelFile(path)
    exps = gf.tensor("blk.1.ffn_gate_exps.weight")
    assert exps.data.dtype == np.uint8 and exps.data.shape[:2] == (16, 256)
    assert not exps.data.flags.owndata  # a view, not a copy
    base = exps.data
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, np.memmap) or type(base).__name__ == "mmap"
    with open(path, "rb") as f:  # the view's bytes are the file's bytes
        f.seek(next(t.offset for t in gf.headers[0].tensors if t.name == exps.name))
        assert f.read(64) == exps.data.reshape(-1)[:64].tobytes()


@pytest.mark.parametrize("n_parts", [2, 3])
def test_split_model_loads_from_its_first_part_and_matches_single_file(tiny, tmp_path, n_parts):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    src = tmp_path / "model.gguf"
    shutil.copy(path, src)
    parts = split_gguf(src, n_parts, tmp_path)
    single, split = hr.load(src, compute="reference"), hr.load(parts[0], compute="reference")
    assert len(split.file.parts) == n_parts
    toks = np.random.default_rng().integers(0, single.n_vocab, 24).tolist()
    a, b = single.logits(toks), split.logits(toks)
    assert np.array_equal(a, b)
    # llama.cpp reads our split layout too: the format is the real one
    theirs_split = llama_cpp_logits(parts[0], toks, yarn_betas=single.yarn_betas)
    assert np.array_equal(theirs_split, llama_cpp_logits(src, toks, yarn_betas=single.yarn_betas))


def test_split_model_with_a_missing_part_is_a_clear_error(tiny, tmp_path):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    src = tmp_path / "m.gguf"
    shutil.copy(path, src)
    parts = split_gguf(src, 3, tmp_path)
    parts[1].unlink()
    with pytest.raises(ModelFormatError, match="incomplete"):
        GGUFModelFile(parts[0])


@pytest.mark.parametrize("cut", [3, 24, 200, 5000, -1000])
def test_truncated_file_is_a_format_error(tiny, tmp_path, cut):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelFormatError):
        hr.load(bad)


def test_random_byte_corruption_never_escapes_as_another_exception(tiny, tmp_path):
    """Flip bytes in the header region: the loader either works or raises HybridError."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    data = bytearray(path.read_bytes())
    header_end = 200_000  # metadata + tokenizer + tensor infos live in the first ~100 KB
    rng = np.random.default_rng()
    bad = tmp_path / "fuzz.gguf"
    for _ in range(40):
        d = bytearray(data)
        for pos in rng.integers(4, header_end, 8):
            d[pos] = int(rng.integers(0, 256))
        bad.write_bytes(d)
        try:
            GGUFModelFile(bad)
        except HybridError:
            pass


def test_wrong_architecture_names_the_supported_ones(tiny, tmp_path):
    import gguf

    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    reader = gguf.GGUFReader(path)
    out = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(out, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match="deepseek2"):
        hr.load(out)
    del reader


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        hr.load(junk)
    with pytest.raises(ModelFormatError, match="no such file"):
        hr.load(tmp_path / "absent.gguf")
    with pytest.raises(HybridError, match="unknown load option"):
        hr.load(junk, compute_mode="x")


@pytest.mark.parametrize("cmd", ["inspect", "generate"])
def test_cli_reports_corrupt_files_in_one_line(tiny, tmp_path, cmd):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:3000])
    args = [sys.executable, "-m", "hybrid_runtime.cli", cmd, str(bad)] + (["-p", "hi"] if cmd == "generate" else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "error:" in r.stderr
