#!/bin/bash
# Issue 32 on one GPU: the prefill benchmark (Llama-3-8B shapes), then the deployed-vs-all-tokens table of the defaults
# against TEAL's recipe on Qwen2.5-0.5B and SmolLM2 (perplexity, zero-shot with --limit 200, GSM8K with --limit 250),
# one process per model side by side; every result in one tar ($OUT/results.tar).
# Set-up: gpu_parts_setup.sh (GGUFs and eval data in parts under .cache/parts, the [eval] extra under .whl). The eval
# data must be version 2 (with gsm8k_cot: `wina fetch-data` from this branch, tarred as evaldata.tar).
set -u
source benchmarks/gpu_parts_setup.sh /tmp/r
python3 benchmarks/bench_prefill.py --out /tmp/r/prefill > /tmp/r/prefill.log 2>&1
echo "prefill: exit $?" >> /tmp/r/rc.txt
TASKS=piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq
run() {
    local name=$1 model=$2; shift 2
    timeout ${LIMIT_S:-480} python3 benchmarks/deployed_table.py "$model" --out "/tmp/r/$name" --device cuda \
        --settings default,teal --calibrate-at each --work "/tmp/wina-deployed-$name" "$@" > "/tmp/r/$name.log" 2>&1
    echo "$name: exit $?" >> /tmp/r/rc.txt
}
run qwen $QWEN --tasks $TASKS --limit 200 --gsm8k-limit 250 &
run smollm2 $SMOL --tasks $TASKS --limit 200 &
wait
nvidia-smi --query-gpu=name --format=csv >> /tmp/r/rc.txt
tar -C /tmp -cf $OUT/results.tar r
