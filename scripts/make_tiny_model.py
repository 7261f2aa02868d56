#!/usr/bin/env python3
"""Write a random deepseek2 GGUF (Kimi K2 / DeepSeek layout), or the trained one, quantized by llama.cpp.

    python scripts/make_tiny_model.py --preset kimi-k2-tiny --quant Q4_K_M --out m.gguf \
        [--seed N] [--f32-twin twin.gguf] [--kv-layout split|combined] [--tied-output]

`--preset kimi-k2-stdlib` exports the trained checkpoint of assets/kimi-k2-stdlib/ (made by
scripts/train_tiny_model.py) instead of drawing random weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import HybridError  # noqa: E402
from hybrid_runtime.synth import FTYPES, TRAINED_PRESET, make_tiny_model, make_trained_model  # noqa: E402
from hybrid_runtime.synth.presets import TINY_PRESETS  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=[*TINY_PRESETS, TRAINED_PRESET])
    ap.add_argument("--quant", default="Q4_K_M", choices=list(FTYPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--f32-twin", type=Path, default=None,
                    help="also write the quantized values dequantized to F32 (the oracle's twin)")
    ap.add_argument("--kv-layout", choices=["split", "combined"], default=None,
                    help="split attn_k_b/attn_v_b (MLA) or legacy attn_kv_b; default per preset")
    ap.add_argument("--tied-output", action="store_true", help="no output.weight (uses token_embd)")
    ap.add_argument("--thinking", nargs="?", const="k2-thinking", default=False, choices=["k2-thinking", "k2.5"],
                    help="a thinking chat template: K2-Thinking (the default) or K2.5 (reads the `thinking` "
                         "variable: chat_template_kwargs {\"thinking\": false} turns reasoning off)")
    ap.add_argument("--no-gating-key", action="store_true",
                    help="omit deepseek2.expert_gating_func (llama.cpp then assumes softmax)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.preset == TRAINED_PRESET:
            out = make_trained_model(a.quant, a.out, kv_layout=a.kv_layout or "split", f32_twin=a.f32_twin)
        else:
            out = make_tiny_model(a.preset, a.quant, a.out, seed=a.seed, f32_twin=a.f32_twin,
                                  kv_layout=a.kv_layout, tied_output=a.tied_output,
                                  thinking=a.thinking, gating_key=not a.no_gating_key)
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {a.preset}, {a.quant}) in {time.perf_counter() - t0:.1f} s")
    if a.f32_twin:
        print(f"wrote {a.f32_twin} (F32 twin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
