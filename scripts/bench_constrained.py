#!/usr/bin/env python3
"""Decode tokens/s with and without a JSON-schema constraint on the same model (issue: structured output).

    python scripts/bench_constrained.py MODEL.gguf [--threads 2] [--n-gen 64] [--reps 3]

Alternates unconstrained and constrained runs (temperature 1.0, the same seeds) and prints the
median decode t/s of each and their ratio. The schema keeps the document open (one long string)
so both runs decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hybrid_runtime as hr  # noqa: E402
from hybrid_runtime.engine.grammar import json_constraint  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}, "n": {"type": "integer"}}, "required": ["story", "n"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    with hr.load(a.model, threads=a.threads) as m:
        make = json_constraint(m.tokenizer, SCHEMA)
        free, constrained, counts = [], [], []
        for seed in range(a.reps + 1):  # the first pair warms up
            for runs, c in ((free, None), (constrained, make())):
                for _ in m.generate("Tell me a story as JSON:", max_tokens=a.n_gen, temperature=1.0, seed=seed,
                                    constraint=c):
                    pass
                if seed:
                    runs.append(m.last_stats.decode_tps)
                    counts.append(m.last_stats.generated_tokens)
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"tokens per run: {sorted(set(counts))}; unconstrained {f:.2f} t/s, JSON schema {c:.2f} t/s, ratio {c / f:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
