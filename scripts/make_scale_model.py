#!/usr/bin/env python3
"""Write a Kimi K2 shaped deepseek2 GGUF of random quant blocks (Q4_K/Q6_K experts).

    python scripts/make_scale_model.py --preset kimi-k2|medium --layers N --out PATH [--metadata-only]

With --layers 1 the single layer is an MoE layer. --metadata-only writes the complete header
and leaves the data region a sparse hole: the full apparent size, no disk used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import HybridError  # noqa: E402
from hybrid_runtime.synth.presets import SCALE_PRESETS  # noqa: E402
from hybrid_runtime.synth.scale import make_scale_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=SCALE_PRESETS)
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: 2048, or the real model's with --metadata-only)")
    ap.add_argument("--metadata-only", action="store_true",
                    help="complete header, data region left as a sparse hole")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = make_scale_model(a.preset, a.out, layers=a.layers, metadata_only=a.metadata_only, seed=a.seed,
                               vocab=a.vocab)
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = out.stat()
    print(f"wrote {out}: {st.st_size / 2**30:.2f} GiB apparent, {st.st_blocks * 512 / 2**30:.2f} GiB on disk, "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
