"""The bounded header parser: each corrupt file gives one ModelFormatError naming the file and the
problem (built from a valid synth model by patching fields), and a fuzzer finds nothing else."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_edit import key_pos, patched, rewrite, tensor_info
from hybrid_runtime.errors import HybridError, ModelFormatError
from hybrid_runtime.synth.split import split_gguf
from hybrid_runtime.weights.gguf_file import GGUFModelFile
from hybrid_runtime.weights.gguf_header import read_header
from hybrid_runtime.weights.model_file import open_model_file

EXPS = "blk.1.ffn_gate_exps.weight"  # Q4_K (16, 256, 256)


@pytest.fixture(scope="module")
def valid(tiny):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    return path.read_bytes()


def _rejects(tmp_path, data: bytes, match: str):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelFormatError, match=match) as e:
        open_model_file(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    return e.value


def _second_of_two_equal_length_keys(valid: bytes) -> tuple[str, str]:
    header = read_header("x", valid)
    by_len: dict[int, str] = {}
    for key in header.metadata:
        if len(key) in by_len:
            return by_len[len(key)], key
        by_len[len(key)] = key
    raise AssertionError("no two keys of one length")


def _field_cases(valid: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (corrupt bytes, expected message)."""
    pos, ne, qtype, offset, offset_pos = tensor_info(valid, EXPS)
    dims_pos = pos + 4
    first, second = _second_of_two_equal_length_keys(valid)
    tokens = key_pos(valid, "tokenizer.ggml.tokens") + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # array count
    prev = tensor_info(valid, "blk.1.ffn_down_exps.weight")
    return {
        "bad magic": (b"GGML" + valid[4:], "not a GGUF file"),
        "version 1": (patched(valid, 4, "I", 1), "unsupported GGUF version 1"),
        "version 4": (patched(valid, 4, "I", 4), "unsupported GGUF version 4"),
        "tensor count": (patched(valid, 8, "Q", 1 << 40), "cannot fit"),
        "key count": (patched(valid, 16, "Q", (1 << 64) - 1), "cannot fit"),
        "string past the end": (patched(valid, 24, "Q", len(valid)), "key 0 .* only .* left"),
        "array past the end": (patched(valid, tokens, "Q", 1 << 50), "tokenizer.ggml.tokens.*strings"),
        "duplicate key": (valid.replace(struct.pack("<Q", len(second)) + second.encode(),
                                        struct.pack("<Q", len(first)) + first.encode()), "duplicate metadata key"),
        "duplicate tensor": (valid.replace(b"blk.2.attn_q_a.weight", b"blk.1.attn_q_a.weight"), "duplicate tensor name"),
        "five dimensions": (patched(valid, pos, "I", 5), "5 dimensions"),
        "zero dimensions": (patched(valid, pos, "I", 0), "0 dimensions"),
        "zero shape": (patched(valid, dims_pos + 8, "Q", 0), "invalid shape"),
        "negative shape": (patched(valid, dims_pos + 8, "q", -256), "invalid shape"),
        "overflowing shape": (patched(patched(valid, dims_pos + 8, "Q", 1 << 40), dims_pos + 16, "Q", 1 << 40), "overflows"),
        "unknown type": (patched(valid, dims_pos + 8 * len(ne), "I", 99), "unknown type 99"),
        "row not a block multiple": (patched(valid, dims_pos, "Q", 128), "not a multiple of its Q4_K block of 256"),
        "unaligned offset": (patched(valid, offset_pos, "Q", offset + 8), "not aligned"),
        "overlapping data": (patched(valid, offset_pos, "Q", offset - 32), "overlaps"),
        "out of order": (patched(valid, prev[4], "Q", 0), "out of order"),
        "gap": (patched(valid, offset_pos, "Q", offset + 1024), "gap"),
        "truncated download": (valid[: len(valid) - 1000], "runs past the end of the file"),
        "nested array": (patched(valid, tokens - 4, "I", 9), "nested arrays"),
        "unknown value type": (patched(valid, 24 + 8 + len(next(iter(read_header("x", valid).metadata))), "I", 77),
                               "unknown value type 77"),
    }


CASES = ["bad magic", "version 1", "version 4", "tensor count", "key count", "string past the end",
         "array past the end", "duplicate key", "duplicate tensor", "five dimensions", "zero dimensions",
         "zero shape", "negative shape", "overflowing shape", "unknown type", "row not a block multiple",
         "unaligned offset", "overlapping data", "out of order", "gap", "truncated download", "nested array",
         "unknown value type"]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_field_is_one_clear_error(valid, tmp_path, case):
    data, match = _field_cases(valid)[case]
    assert data != valid
    _rejects(tmp_path, data, match)


def test_the_untouched_file_passes_and_views_hold_its_bytes(valid, tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(valid)
    gf, _, cfg = open_model_file(good)
    _, ne, _, offset, _ = tensor_info(valid, EXPS)
    ref = gf.tensor(EXPS)
    assert ref.shape == tuple(reversed(ne)) and ref.shape[0] == cfg.n_expert
    start = gf.headers[0].data_start + offset
    assert ref.data.tobytes() == valid[start:start + ref.n_bytes]


def test_alignment_that_is_not_a_power_of_two(tiny, tmp_path):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    aligned = rewrite(path, tmp_path / "a64.gguf", alignment=64)
    assert GGUFModelFile(aligned).headers[0].alignment == 64  # a valid custom alignment is followed
    data = aligned.read_bytes()
    pos = key_pos(data, "general.alignment") + 8 + len("general.alignment") + 4
    _rejects(tmp_path, patched(data, pos, "I", 48), "alignment 48 is not a power of two")


def test_split_parts_that_do_not_match(tiny, tmp_path):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    src = tmp_path / "m.gguf"
    shutil.copy(path, src)
    parts = split_gguf(src, 3, tmp_path)
    GGUFModelFile(parts[0])
    parts[1].rename(tmp_path / "swap")  # parts 2 and 3 swapped
    parts[2].rename(parts[1])
    (tmp_path / "swap").rename(parts[2])
    with pytest.raises(ModelFormatError, match="split.no 2.*part 1.*mismatched split parts"):
        GGUFModelFile(parts[0])
    lone = tmp_path / "lone.gguf"
    shutil.copy(parts[0], lone)  # one part under a plain name
    with pytest.raises(ModelFormatError, match="split.count 3.*no sibling parts"):
        GGUFModelFile(lone)


def _mutations():
    """A list of (kind, position in the header, value): byte flips, u32/u64 overwrites, a cut."""
    value = st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 4, 5, 9, 31, 255, 1 << 16, (1 << 32) - 1,
                                                             1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]))
    one = st.tuples(st.sampled_from(["B", "I", "Q"]), st.integers(4, 61_000), value)
    return st.tuples(st.lists(one, min_size=1, max_size=6), st.one_of(st.none(), st.integers(0, 6_000_000)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(_mutations())
def test_fuzzed_headers_give_only_project_errors(valid, tmp_path, mutation):
    edits, cut = mutation
    data = bytearray(valid)
    for fmt, pos, v in edits:
        size = struct.calcsize(fmt)
        struct.pack_into("<" + fmt, data, pos, v & ((1 << (8 * size)) - 1))
    bad = tmp_path / "fuzz.gguf"
    bad.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    try:
        gf, _, _ = open_model_file(bad)
    except HybridError as e:
        assert "\n" not in str(e)
        return
    for ref in gf.tensors.values():  # accepted: every view lies inside the file
        assert ref.data.nbytes == ref.n_bytes
    np.asarray(gf.tensor("output_norm.weight").data).sum()
