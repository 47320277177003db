#!/bin/bash
# The output head's gate on the real models, on this CPU (benchmarks/results/cpu/head/): convert at each layer
# target with --head-sparsity 0.5 (convert's other defaults), then held-out perplexity (wina eval --json) with the
# head dense, at 0.3 and at 0.5, from the same checkpoint. Usage: bash benchmarks/head_table.sh OUT MODEL_DIR NAME TARGETS...
set -euo pipefail
out=$1; model=$2; name=$3; shift 3
mkdir -p "$out"
for s in "$@"; do
  ckpt="$out/ckpt-$name-$s"
  /usr/bin/time -f "convert %e s" .venv/bin/wina convert "$model" --sparsity "$s" --head-sparsity 0.5 -o "$ckpt" --overwrite -q 2> "$out/$name-$s-convert.log"
  for h in 0 0.3 0.5; do
    .venv/bin/wina eval "$ckpt" --json --head-sparsity "$h" > "$out/$name-s$s-h$h.json"
  done
  rm -rf "$ckpt"
done
