#!/bin/bash
# The second head-in-the-budget accuracy run (H200, 2026-12-03): what the first (gpu_accuracy_head.sh) lost or did not
# reach. Qwen's `wina-output-head` one process per sparsity (it stopped after two cells as one process), SmolLM2's
# other three settings again; every result goes into one tar ($OUT/results.tar: a call brings back only a few files).
# Set-up: gpu_parts_setup.sh (GGUFs and eval data in parts under .cache/parts, the [eval] extra under .whl).
set -u
source benchmarks/gpu_parts_setup.sh /tmp/r
COMMON=(--device cuda --speed-curve benchmarks/results/speed_curve_h200.json
        --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada_openai,mmlu
        --limit 200 --mmlu-limit 3 --batch-size 16)
run() {
    local name=$1 model=$2 settings=$3 sparsities=$4; shift 4
    OMP_NUM_THREADS=2 timeout ${LIMIT_S:-530} python3 benchmarks/accuracy_table.py "$model" --out "/tmp/r/$name" \
        --settings "$settings" --sparsities "$sparsities" --work "/tmp/wina-acc-$name" "${COMMON[@]}" "$@" > "/tmp/r/$name.log" 2>&1
    echo "$name: exit $?" >> /tmp/r/rc.txt
}
run q-head-05 $QWEN wina-output-head 0.5 --off-target 0.4,0.65 &
run q-head-04 $QWEN wina-output-head 0.4 &
run q-head-065 $QWEN wina-output-head 0.65 &
run s-thead $SMOL teal-output-head 0.5,0.4,0.65 &
run s-out $SMOL wina-output 0.5,0.4,0.65 &
run s-tout $SMOL teal-output 0.5,0.4,0.65 &
wait
nvidia-smi --query-gpu=name --format=csv >> /tmp/r/rc.txt
tar -C /tmp -cf $OUT/results.tar r
