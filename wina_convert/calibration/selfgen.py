"""``--calibration self``: the model writes its own calibration text (data-free, offline, any model).

Calibration needs text that drives the model's activations the way real use will. When no corpus
is at hand, or its licence is unclear, the model can supply one: it continues a handful of short
seed prompts of different registers (prose, dialogue, code, maths, structured data, several
languages) by sampling at temperature 1 with nucleus (top-p) filtering. What comes out follows
the model's own distribution, which is the distribution the thresholds will be applied to.
Sampling is batched with a KV cache (``generate``) and seeded, so the text is reproducible for a
given model, seed and device.

Memory stays bounded (issue 18): on a GPU the model is loaded straight onto it in its own dtype; on
the CPU a model whose float32 copy would exceed ``WHOLE_MODEL_BYTES`` is *streamed*: the embedding,
final norm and head are held, and each decoder layer gets its weights (read from the source, cast to
float32) only while it runs, so the host holds one layer at a time, as conversion itself does. The
arithmetic is the same either way; streaming costs one read of the layers per sampled token.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WinaError, one_line
from ..progress import quiet_transformers
from .text import tokenizer_of

# Openings in several registers and languages; the model writes the rest. Plain text, no chat
# template, so that base and instruct models alike simply continue them.
SEED_PROMPTS = (
    "The history of the little harbour town begins in the winter of",
    "User: What is a good way to learn a new language as an adult?\nAssistant:",
    "def parse_config(path):\n    \"\"\"Read a config file and return a dict of settings.\"\"\"\n",
    "Theorem. For every positive integer n, the sum of the first n odd numbers",
    "## Installation\n\nTo install the package, first",
    "La réunion du conseil municipal a commencé à",
    "Der neue Bahnhof der Stadt wurde im Jahr",
    "El informe anual de la empresa muestra que",
    "Dear Dr. Okafor,\n\nThank you for your letter of",
    "In this paper we study the problem of",
    "{\n  \"name\": \"inventory\",\n  \"items\": [",
    "Step 1: Preheat the oven to",
    "今天早上，我们在公园里",
    "SELECT customer_id, COUNT(*) AS orders\nFROM",
    "Breaking news: officials confirmed on Tuesday that",
    "Il était une fois, dans un petit village au bord de la mer,",
)
TEMPERATURE = 1.0
TOP_P = 0.95
MARGIN = 1.1  # generate a little more than seq_len tokens: re-tokenized text can come out shorter
WHOLE_MODEL_BYTES = 4 * 1024**3  # above this (float32 on the CPU), the layers are streamed


def self_generated_texts(source: Any, samples: int, seq_len: int, seed: int, *,
                         device: torch.device | str = "cpu", batch: int = 16,
                         whole_model_bytes: int = WHOLE_MODEL_BYTES) -> list[str]:
    """``samples`` documents sampled from the model, each long enough to fill ``seq_len`` tokens.

    ``source`` is a ``checkpoint.source.Source``. The model is loaded once on ``device`` (in its own
    dtype on a GPU; float32 on a CPU, streamed layer by layer when larger than ``whole_model_bytes``),
    used to sample, then released.
    """
    tokenizer = tokenizer_of(source)
    device = torch.device(device)
    if device.type == "cpu" and _float32_bytes(source) > whole_model_bytes:
        model = _streamed_model(source)
    else:
        model = _load_model(source, device)
    try:
        prompts = list(SEED_PROMPTS)
        random.Random(seed).shuffle(prompts)
        chosen = [prompts[i % len(prompts)] for i in range(samples)]
        new_tokens = int(seq_len * MARGIN) + 8
        texts: list[str] = []
        for start in range(0, samples, batch):
            texts.extend(_sample(model, tokenizer, chosen[start : start + batch], new_tokens, seed + start))
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return texts


def _float32_bytes(source: Any) -> int:
    return 4 * sum(source.numel(name) for name in source.names)


def _streamed_model(source: Any) -> Any:
    """The source as a float32 causal LM on the CPU whose decoder layers hold their weights only while
    they run (forward hooks read them from ``source`` and drop them again)."""
    from transformers import AutoModelForCausalLM

    from ..arch import adapter_for

    adapter = adapter_for(source.config.model_type)
    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32)
    layers = model.get_submodule(adapter.layers_prefix)
    inside = {id(p) for p in layers.parameters()}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if id(param) in inside or name == adapter.lm_head:
            continue
        _set_parameter(model, name, source.tensor(name).to(torch.float32))
    if source.has(adapter.lm_head):
        _set_parameter(model, adapter.lm_head, source.tensor(adapter.lm_head).to(torch.float32))
    else:  # tied
        model.get_submodule(adapter.lm_head.rpartition(".")[0]).weight = model.get_submodule(adapter.embed.rpartition(".")[0]).weight
    rotary_cls = adapter.model_classes()[2]
    for name, module in list(model.named_modules()):
        if isinstance(module, rotary_cls):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, rotary_cls(config=source.config))
    outside = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_meta and not n.startswith(adapter.layers_prefix + ".")]
    if outside:
        raise WinaError(f"cannot stream this model for self-calibration: {outside[:3]} are not in the weights")
    for index, layer in enumerate(layers):
        prefix = f"{adapter.layers_prefix}.{index}."
        names = [n for n, _ in layer.named_parameters()]

        def fill(module, args, prefix=prefix, names=names):
            for n in names:
                _set_parameter(module, n, source.tensor(prefix + n).to(torch.float32))

        def drop(module, args, output, names=names):
            for n in names:
                parent, _, attr = n.rpartition(".")
                owner = module.get_submodule(parent) if parent else module
                owner._parameters[attr] = nn.Parameter(torch.empty_like(owner._parameters[attr], device="meta"),
                                                        requires_grad=False)

        layer.register_forward_pre_hook(fill)
        layer.register_forward_hook(drop)
    return model.eval()


def _set_parameter(root: Any, name: str, tensor: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _load_model(source: Any, device: torch.device) -> Any:
    """The source as a transformers causal LM, in eval mode on ``device`` (on a GPU straight onto it)."""
    from transformers import AutoModelForCausalLM

    dtype = source.dtype
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # half-precision matmuls on a CPU are slow, or missing
    with quiet_transformers():
        try:
            if source.files:  # a local (or downloaded) Hugging Face directory
                directory = Path(next(iter(source.files.values()))).parent
                placement = {"device_map": {"": device}} if device.type == "cuda" else {}
                model = AutoModelForCausalLM.from_pretrained(directory, config=source.config, dtype=dtype, **placement)
            else:  # tensors already in memory (a dequantized .gguf)
                model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
                missing, unexpected = model.load_state_dict(dict(source.tensors), strict=False)
                if unexpected or any(not _tied(model, name) for name in missing):
                    raise WinaError(f"cannot rebuild the model for self-calibration: missing {missing[:3]}, unexpected {unexpected[:3]}")
        except (OSError, ValueError, RuntimeError) as e:
            raise WinaError(f"cannot load the model to write its calibration text: {one_line(e)[:200]}") from e
    return model.to(device).eval()


def _tied(model: Any, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


@torch.no_grad()
def _sample(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, seed: int) -> list[str]:
    """One batch of continuations (prompt included), sampled with a KV cache, EOS suppressed."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True) if tokenizer.pad_token is not None else \
            _pad_left([tokenizer(p)["input_ids"] for p in prompts], pad)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                             top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                             use_cache=True)
    width = mask.shape[1]
    return [tokenizer.decode(row[width - int(m.sum()):], skip_special_tokens=True) for row, m in zip(out, mask)]


def _pad_left(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}
