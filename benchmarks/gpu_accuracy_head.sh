#!/bin/bash
# The head-in-the-budget accuracy run of 2026-12-03 (H200): GGUFs and eval data carried in parts under .cache/parts, the [eval] extra as wheels under .whl; eight accuracy_table.py processes
set -u
source benchmarks/gpu_parts_setup.sh $OUT
COMMON=(--device cuda --sparsities 0.5,0.4,0.65 --speed-curve benchmarks/results/speed_curve_h200.json
        --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada_openai,mmlu
        --limit 200 --mmlu-limit 3 --batch-size 16)
run() {
    local name=$1 model=$2 settings=$3; shift 3
    OMP_NUM_THREADS=2 timeout ${LIMIT_S:-520} python3 benchmarks/accuracy_table.py "$model" --out "$OUT/$name" \
        --settings "$settings" --work "/tmp/wina-acc-$name" "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?" >> $OUT/rc.txt
}
run q-head $QWEN wina-output-head --off-target 0.4,0.65 &
run q-thead $QWEN teal-output-head &
run q-out $QWEN wina-output &
run q-tout $QWEN teal-output &
run s-head $SMOL wina-output-head --off-target 0.4,0.65 &
run s-thead $SMOL teal-output-head &
run s-out $SMOL wina-output &
run s-tout $SMOL teal-output &
wait
nvidia-smi --query-gpu=name --format=csv >> $OUT/rc.txt
