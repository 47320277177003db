#!/usr/bin/env bash
# The accuracy tables of SmolLM2-135M and Qwen2.5-0.5B on one GPU, as eight parallel processes
# (small models leave the GPU mostly idle, so settings run side by side), each a
# benchmarks/accuracy_table.py run into its own directory under OUT; merge them with
#   python benchmarks/accuracy_table.py --merge OUT/smollm2-* --out benchmarks/results/accuracy/smollm2
#
#   bash benchmarks/gpu_accuracy.sh SMOLLM2.gguf QWEN.gguf OUT [SECONDS]
#
# Needs the [eval] extra and the task data ($WINA_CACHE/eval-data, `wina fetch-data`). SECONDS
# bounds each process (default 540): a process stopped early keeps the cells it finished.
set -uo pipefail
SMOL=$1 QWEN=$2 OUT=$3 LIMIT_S=${4:-540}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
COMMON=(--device cuda --sparsities 0.5,0.65,0.4 --speed-curve benchmarks/results/speed_curve_h200.json
        --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada_openai,mmlu
        --limit 300 --mmlu-limit 5 --batch-size 16)
if ! "${PYTHON:-python3}" -c "import lm_eval, datasets; from lm_eval.models.huggingface import HFLM" >"$OUT/preflight.log" 2>&1; then
    echo "lm-eval does not import (see $OUT/preflight.log): perplexity only"
    COMMON=("${COMMON[@]:0:6}")
fi
run() {  # NAME MODEL SETTINGS [more options]
    local name=$1 model=$2 settings=$3
    shift 3
    OMP_NUM_THREADS=2 timeout "$LIMIT_S" "${PYTHON:-python3}" benchmarks/accuracy_table.py "$model" --out "$OUT/$name" \
        --settings "$settings" --work "/tmp/wina-acc-$name" "${COMMON[@]}" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
run smollm2-teal "$SMOL" teal --off-target 0.4,0.65 &
run smollm2-wina "$SMOL" wina --off-target 0.4,0.65 &
run smollm2-output "$SMOL" wina-output --off-target 0.4,0.65 &
run smollm2-more "$SMOL" teal-output,wina-heads,wina-transform --task-settings teal-output &
run qwen-teal "$QWEN" teal --off-target 0.4,0.65 &
run qwen-wina "$QWEN" wina --off-target 0.4,0.65 &
run qwen-output "$QWEN" wina-output --off-target 0.4,0.65 &
run qwen-more "$QWEN" teal-output,wina-heads --task-settings teal-output &
wait
