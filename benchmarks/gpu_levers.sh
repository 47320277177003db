#!/usr/bin/env bash
# The levers of round 2026-12-02 on SmolLM2-135M at convert's full calibration (16 x 512), perplexity on the
# bundled held-out text, on one GPU as parallel processes (each a benchmarks/accuracy_table.py run into its
# own directory under OUT; merge them with
#   python benchmarks/accuracy_table.py --merge OUT/smollm2-* --out benchmarks/results/accuracy_h200/levers
#
#   bash benchmarks/gpu_levers.sh SMOLLM2.gguf OUT [SECONDS]
set -uo pipefail
SMOL=$1 OUT=$2 LIMIT_S=${3:-300}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
COMMON=(--device cuda --sparsities 0.5,0.65,0.4 --speed-curve benchmarks/results/speed_curve_h200.json)
run() {  # NAME SETTINGS [more options]
    local name=$1 settings=$2
    shift 2
    OMP_NUM_THREADS=2 timeout "$LIMIT_S" "${PYTHON:-python3}" benchmarks/accuracy_table.py "$SMOL" --out "$OUT/$name" \
        --settings "$settings" --work "/tmp/wina-lev-$name" "${COMMON[@]}" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
run smollm2-teal teal &
run smollm2-wina wina &
run smollm2-output default &
run smollm2-lowrank4 wina-lowrank4 &
run smollm2-lowrank8 wina-lowrank8 &
run smollm2-teal-lowrank8 teal-lowrank8 &
run smollm2-default-lowrank8 default-lowrank8 &
run smollm2-pooled wina-transform-pooled &
wait
