#!/usr/bin/env python3
"""Compare expert-cache policies (ours, LRU, LFU, static oracle) on routing traces.

    python scripts/cache_sim.py [--trace routing.jsonl ...] [--tokens 4000] [--plot docs/cache_policy.png]

Without --trace, three synthetic Kimi K2 shaped traces (60 layers x 384 experts x 8 per token):
stationary Zipf, Zipf with temporal locality, and Zipf with locality and drift. Recorded files
come from the runtime's --record-routing (JSON lines per layer). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import HybridError  # noqa: E402
from hybrid_runtime.experts import cache_sim  # noqa: E402
from hybrid_runtime.experts.gpu_cache import load_routing  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", type=Path, default=[], help="recorded routing file (repeatable)")
    ap.add_argument("--experts", type=int, default=384, help="experts per layer of recorded traces / synthetic")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of hit rate vs cache size")
    return ap.parse_args(argv)


def traces(a) -> dict[str, tuple]:
    if a.trace:
        return {p.name: (cache_sim.trace_from_record(load_routing(p)), a.experts) for p in a.trace}
    shape = dict(n_tokens=a.tokens, n_layers=a.layers, n_experts=a.experts, k=8, seed=a.seed)
    return {
        "stationary Zipf(1.0)": (cache_sim.synthetic_trace(stickiness=0.0, drift=0.0, **shape), a.experts),
        "Zipf + locality": (cache_sim.synthetic_trace(stickiness=1.5, drift=0.0, **shape), a.experts),
        "Zipf + locality + drift": (cache_sim.synthetic_trace(stickiness=1.5, drift=0.02, **shape), a.experts),
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        results = {}
        for name, (trace, n_experts) in traces(a).items():
            results[name] = cache_sim.compare(trace, n_experts)
            print(f"### {name} ({trace.shape[0]} tokens x {trace.shape[1]} layers x {trace.shape[2]} per token)\n")
            print("hit rate (expert copies per token)\n")
            print(cache_sim.markdown_table(results[name]) + "\n")
        if a.plot:
            cache_sim.plot(results, a.plot)
            print(f"wrote {a.plot}")
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
