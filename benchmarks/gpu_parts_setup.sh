# Sourced by the H200 head-budget runs (gpu_accuracy_head.sh, gpu_accuracy_head2.sh): joins the GGUFs and the eval
# data carried in parts under .cache/parts, installs the [eval] extra from the wheels under .whl into /tmp/site, and
# leaves SMOL, QWEN, PYTHONPATH and WINA_CACHE set. Its checks (sha.txt, pip.log, preflight.txt) go to the folder
# given as its argument.
results=$1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/p/cache/qwen2.5-0.5b /tmp/p/cache/smollm2 "$results"
cat .cache/parts/q00 .cache/parts/qr0* > /tmp/p/cache/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
cat .cache/parts/s00 .cache/parts/s01 > /tmp/p/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/p/cache/*/*.gguf > "$results/sha.txt"
tar -C /tmp/p/cache -xf .cache/parts/evaldata.tar
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$results/pip.log" 2>&1
export PYTHONPATH=$PWD:/tmp/site WINA_CACHE=/tmp/p/cache
python3 -c "import lm_eval, datasets, gguf; from lm_eval.models.huggingface import HFLM; print('ok')" > "$results/preflight.txt" 2>&1
SMOL=/tmp/p/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf QWEN=/tmp/p/cache/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
