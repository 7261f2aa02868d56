#!/usr/bin/env bash
# Every figure in docs/benchmarks.md, in one run, one benchmark at a time (never two at once:
# llama.cpp with 2 threads slows 30-100x when anything else runs). Writes JSON to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
T=${THREADS:-2}
OUT=${OUT:-bench-results}
mkdir -p "$OUT" models
[ -f models/medium-12L.gguf ] || $BIN/python scripts/make_scale_model.py --preset medium --layers 12 --out models/medium-12L.gguf
[ -f models/k2-scale-1L.gguf ] || $BIN/python scripts/make_scale_model.py --preset kimi-k2 --layers 1 --out models/k2-scale-1L.gguf
TINY=models/kimi-k2-tiny-Q4_K_M.gguf
[ -f $TINY ] || $BIN/python scripts/make_tiny_model.py --preset kimi-k2-tiny --quant Q4_K_M --out $TINY
$BIN/hybrid-runtime bench kernels --threads $T --json > "$OUT/kernels.json"
$BIN/hybrid-runtime bench decode models/medium-12L.gguf --threads $T --compare-llama-cpp --n-gen 48 --json > "$OUT/medium_decode.json"
$BIN/hybrid-runtime bench prefill models/medium-12L.gguf --threads $T --compare-llama-cpp --n-prompt 512 --json > "$OUT/medium_prefill.json"
$BIN/hybrid-runtime bench decode models/k2-scale-1L.gguf --threads $T --compare-llama-cpp --n-gen 24 --json \
    --plot docs/roofline_k2_layer.png > "$OUT/k2_layer_decode.json"
$BIN/hybrid-runtime bench decode $TINY --threads $T --n-gen 100 --json > "$OUT/tiny_decode_overhead.json"
$BIN/python scripts/bench_row_groups.py > "$OUT/row_groups.md"
$BIN/hybrid-runtime bench swarm models/medium-12L.gguf --threads $T --clients 1,4,16,64 --plot docs/swarm_medium.png --json > "$OUT/medium_swarm.json"
echo "results in $OUT/"
