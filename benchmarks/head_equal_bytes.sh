#!/bin/bash
# Layer-only checkpoints (dense head, convert's defaults) at the sparsity whose bytes per token match the
# head-gated rows of benchmarks/results/cpu/head/: SmolLM2 at 0.52, Qwen2.5-0.5B at 0.65.
# Usage: bash benchmarks/head_equal_bytes.sh OUT SMOLLM2_DIR QWEN_DIR
set -euo pipefail
out=$1; mkdir -p "$out"
run() {  # name model sparsity
  ckpt="$out/ckpt-$1-$3"
  /usr/bin/time -f "convert %e s" .venv/bin/wina convert "$2" --sparsity "$3" -o "$ckpt" --overwrite -q 2> "$out/$1-$3-nohead-convert.log"
  .venv/bin/wina eval "$ckpt" --json > "$out/$1-s$3-nohead.json"
  rm -rf "$ckpt"
}
run smollm2 "$2" 0.52
run qwen "$3" 0.65
