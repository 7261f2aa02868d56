"""The weight store: every mode yields the same bytes and the same model output."""

from __future__ import annotations

import numpy as np
import psutil
import pytest

import hybrid_runtime as hr
from hybrid_runtime.experts import store
from hybrid_runtime.experts.backends import expert_tensor_names
from hybrid_runtime.weights.gguf_file import GGUFModelFile


@pytest.mark.parametrize("mode", ["mmap", "lazy", "hugepages", "auto"])
def test_store_modes_keep_the_bytes(tiny, mode):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    gf, original = GGUFModelFile(path), GGUFModelFile(path)
    names = expert_tensor_names(gf, 1) + expert_tensor_names(gf, 2) + ["blk.1.attn_output.weight"]
    report = store.prepare(gf, names, mode, show_progress=False)
    assert report.bytes == sum(original.tensor(n).n_bytes for n in names)
    assert report.mode in ("mmap", "hugepages") if mode == "auto" else report.mode == mode
    for name in names:
        a, b = original.tensor(name).data, gf.tensor(name).data
        assert np.array_equal(a, b) and a.shape == b.shape and a.dtype == b.dtype
        copied = not np.shares_memory(gf.tensor(name).data, gf._maps[0])
        assert copied == (report.mode == "hugepages")
    untouched = gf.tensor("blk.0.attn_output.weight").data
    assert np.shares_memory(untouched, gf._maps[0])


def test_auto_falls_back_to_mmap_when_the_copy_does_not_fit(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1 << 30})())
    assert store.resolve("auto", 10 << 30) == "mmap"
    assert store.resolve("hugepages", 10 << 30) == "hugepages"


@pytest.mark.parametrize("mode", ["hugepages", "lazy"])
def test_store_gives_identical_logits(tiny, mode):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    toks = np.random.default_rng().integers(0, 2000, 20).tolist()
    a = hr.load(path, expert_store="mmap").logits(toks)
    m = hr.load(path, expert_store=mode)
    assert ("huge pages" in m.placement_summary()) == (mode == "hugepages")
    np.testing.assert_array_equal(a, m.logits(toks))


def test_large_copy_drops_the_page_cache_behind_it(tiny, monkeypatch):
    """A copy of more than a quarter of RAM fadvises the file's pages away as it goes: same bytes."""
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    gf, original = GGUFModelFile(path), GGUFModelFile(path)
    dropped = []
    real = store._PageCacheDropper.__call__
    monkeypatch.setattr(store._PageCacheDropper, "__call__", lambda self, part, piece: (dropped.append(piece.nbytes), real(self, part, piece)))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 64 << 30, "total": 1 << 20})())
    names = expert_tensor_names(gf, 1)
    store.prepare(gf, names, "hugepages", show_progress=False)
    assert sum(dropped) == sum(original.tensor(n).n_bytes for n in names)
    for name in names:
        assert np.array_equal(original.tensor(name).data, gf.tensor(name).data)
