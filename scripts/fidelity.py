#!/usr/bin/env python3
"""Our default path against llama.cpp on a quantized tiny model, over three texts of the corpus.

    python scripts/fidelity.py [--layers 4] [--dense-lead 1] [--quant Q4_K_M] [--tokens 300] [--no-repack]

Prints, per text: llama.cpp's own spread (ubatch 1 vs 512), our relative L2 against both, and the
share of positions where we match llama.cpp (ubatch 512) to float noise (per-position rel L2 < 1e-5).
`--no-repack` loads llama.cpp without its extra buffer types (CPU_REPACK, AMX): the build we test
with crashed in them on an AMX machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def without_extra_buffers() -> None:
    import llama_cpp.llama_cpp as low  # the module llama_cpp.Llama reads its defaults from

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-lead", type=int, default=1)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--cache", default=".pytest_cache/models")
    ap.add_argument("--no-repack", action="store_true")
    a = ap.parse_args(argv)
    if a.no_repack:
        without_extra_buffers()
    import hybrid_runtime as hr
    from hybrid_runtime.oracle import llama_cpp_logits, rel_l2
    from hybrid_runtime.synth import cached_model, get_preset
    from hybrid_runtime.synth.corpus import CORPUS

    preset = get_preset("kimi-k2-tiny").replace(n_layer=a.layers, n_dense_lead=a.dense_lead)
    path, _ = cached_model(preset, a.quant, a.cache)
    model = hr.load(path)
    paras = [p for p in CORPUS.split("\n\n") if p.strip()]
    for i in range(3):
        toks = model.tokenizer.tokenize(paras[2 * i] + "\n\n" + paras[2 * i + 1])[: a.tokens]
        big = llama_cpp_logits(path, toks, n_ubatch=512, yarn_betas=model.yarn_betas)
        one = llama_cpp_logits(path, toks, n_ubatch=1, yarn_betas=model.yarn_betas)
        ours = model.logits(toks)
        exact = np.mean([rel_l2(ours[t], big[t]) < 1e-5 for t in range(len(toks))])
        print(f"text {i} ({len(toks)} tokens): llama.cpp ub1 vs ub512 {rel_l2(one, big):.2e} | ours vs ub512 "
              f"{rel_l2(ours, big):.2e}, vs ub1 {rel_l2(ours, one):.2e} | positions matching ub512 {exact:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
