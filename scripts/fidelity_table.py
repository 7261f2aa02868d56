#!/usr/bin/env python3
"""Fidelity of each quantization and numeric path on the trained model, against its F32 export.

    python scripts/fidelity_table.py [--n-ctx 512] [--chunks 16] [--threads 2] [--cache models/fidelity]

The text is this project's own Python (hybrid_runtime/**/*.py, in no training corpus). The base is
the reference path on the F32 file; for every quant: perplexity, bits per byte and KL-divergence
to that base of our reference path (`compute="reference"`, exact dequantized weights), our default
path (the compiled CPU step for small chunks, llama.cpp's activation rounding; windows of n_ctx >= 96
tokens prefill through the torch model, where the Q4_K/Q6_K/Q8_0 matrices and expert groups of >= 8
tokens run through the integer panel GEMM, `prefill_precision="int8"`, and the other types in bf16),
bf16 prefill (`prefill_precision="bf16"`: every long-chunk matrix dequantized to bf16), the integer
kernels throughout (`prefill_chunk=64`, as decode runs), exact prefill (`prefill_precision="exact"`:
the non-expert matrices of long chunks in float32 with llama.cpp's activation rounding) and
llama.cpp on the same file; and each path's top-1 agreement with llama.cpp.
Prints a Markdown table (and `--json FILE` writes the figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hybrid_runtime as hr  # noqa: E402
from hybrid_runtime import perplexity as px  # noqa: E402
from hybrid_runtime.oracle import llama_cpp_scorer  # noqa: E402
from hybrid_runtime.synth import TRAINED_PRESET, cached_model  # noqa: E402

QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
PATHS = {"reference": {"compute": "reference"}, "default": {}, "bf16 prefill": {"prefill_precision": "bf16"},
         "integer kernels": {"prefill_chunk": 64}, "exact prefill": {"prefill_precision": "exact"}}


def held_out_text() -> str:
    return "".join(p.read_text() for p in sorted((ROOT / "hybrid_runtime").rglob("*.py")))


def measure(path: Path, windows, base, threads: int, **load):
    m = hr.load(path, n_ctx=windows.n_ctx, threads=threads, **load)
    lp = px.scored_log_probs(m.logits, windows)
    figures = _figures(lp, windows, base, m.tokenizer.token_bytes)
    m.close()
    return figures, lp


def measure_llama(path: Path, windows, base, threads: int, betas, token_bytes):
    with llama_cpp_scorer(path, windows.n_ctx, threads=threads, yarn_betas=betas) as score:
        lp = px.scored_log_probs(score, windows)
    return _figures(lp, windows, base, token_bytes), lp


def _figures(lp, windows, base, token_bytes) -> dict:
    out = px.perplexity(lp, windows, token_bytes).as_dict()
    if base is not None:
        out.update(px.kl_divergence(base, lp).as_dict())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / "models" / "fidelity")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated quant types")
    a = ap.parse_args(argv)
    f32 = cached_model(TRAINED_PRESET, "F32", a.cache)[0]
    m = hr.load(f32, compute="reference", n_ctx=a.n_ctx, threads=a.threads)
    windows = px.make_windows(m.tokenize(held_out_text()), a.n_ctx, a.chunks)
    base = px.scored_log_probs(m.logits, windows)
    rows = {"F32": {"reference": _figures(base, windows, None, m.tokenizer.token_bytes),
                    "llama.cpp": measure_llama(f32, windows, base, a.threads, m.yarn_betas, m.tokenizer.token_bytes)[0]}}
    for q in a.quants.split(","):
        path = cached_model(TRAINED_PRESET, q, a.cache)[0]
        theirs, lp_theirs = measure_llama(path, windows, base, a.threads, m.yarn_betas, m.tokenizer.token_bytes)
        rows[q] = {}
        for name, load in PATHS.items():
            figures, lp = measure(path, windows, base, a.threads, **load)
            figures["top1_vs_llama_cpp"] = px.kl_divergence(lp_theirs, lp).top1
            rows[q][name] = figures
        rows[q]["llama.cpp"] = theirs
        print(f"{q} done", file=sys.stderr, flush=True)
    print(f"{windows.n_windows} windows of {a.n_ctx} tokens, {rows['F32']['reference']['scored_tokens']} scored "
          f"({rows['F32']['reference']['bytes']} bytes)\n")
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def markdown(rows: dict) -> str:
    """One row per (quant, path): PPL, bits per byte, KLD to F32 (mean, p99), top-1 vs F32 and vs llama.cpp."""
    lines = ["| quant | path | PPL | bits/byte | KLD mean | KLD p99 | top-1 vs F32 | top-1 vs llama.cpp |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for q, r in rows.items():
        for path, d in r.items():
            kld = (f"{d['kld_mean']:.5f}", f"{d['kld_p99']:.4f}", f"{100 * d['top1_agreement']:.2f} %") \
                if "kld_mean" in d else ("–",) * 3
            vs = f"{100 * d['top1_vs_llama_cpp']:.2f} %" if "top1_vs_llama_cpp" in d else "–"
            lines.append(f"| {q} | {path} | {d['perplexity']:.3f} | {d['bits_per_byte']:.4f} | " + " | ".join(kld) + f" | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
