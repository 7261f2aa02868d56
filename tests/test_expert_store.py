"""The expert store: every mode yields the same bytes and the same model output."""

from __future__ import annotations

import numpy as np
import pytest

import hybrid_runtime as hr
from hybrid_runtime.experts import store
from hybrid_runtime.experts.backends import expert_refs
from hybrid_runtime.weights.gguf_file import GGUFModelFile


@pytest.mark.parametrize("mode", ["mmap", "lazy", "hugepages"])
def test_store_modes_keep_the_bytes(tiny, mode):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    gf = GGUFModelFile(path)
    layers = {1: expert_refs(gf, 1), 2: expert_refs(gf, 2)}
    out, report = store.prepare(layers, mode, show_progress=False)
    assert report.bytes == sum(r.n_bytes for refs in layers.values() for r in refs)
    for layer, refs in layers.items():
        for a, b in zip(refs, out[layer]):
            assert np.array_equal(a.data, b.data) and a.data.shape == b.data.shape
            copied = not np.shares_memory(a.data, b.data)
            assert copied == (mode == "hugepages")


def test_hugepage_store_gives_identical_logits(tiny):
    path, _ = tiny("kimi-k2-tiny", "Q4_K_M")
    toks = np.random.default_rng().integers(0, 2000, 20).tolist()
    a = hr.load(path).logits(toks)
    b = hr.load(path, expert_store="hugepages").logits(toks)
    np.testing.assert_array_equal(a, b)
