"""``wina eval``: dense vs sparse perplexity on held-out text, and the sparsity actually achieved."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..calibration.text import eval_windows, heldout_texts
from ..errors import WinaError
from .protocol import ALL_TOKENS, DEPLOYED, check_protocol, decode_positions

DEFAULT_EVAL_TOKENS = 8192
LOGITS_BUDGET = 1 << 29  # bytes of float32 logits per forward: 4 windows of 512 for SmolLM2, 1 for Gemma 3's 262k vocabulary


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch: int = 4, prompt: int | None = None) -> float:
    """exp of the mean next-token loss over all windows, at most ``batch`` windows a forward (fewer where a
    large vocabulary's logits would pass ``LOGITS_BUDGET``; the sum of the losses does not depend on it).

    ``prompt``: the deployed protocol (``protocol.py``): each window's first ``prompt`` tokens are a prompt, run
    dense and not scored; the tokens after it are scored, their positions gated (one forward that computes what
    a dense prefill and gated one-token decode steps compute). None: every token gated (as the runtime's
    gates are set) and every next token scored.
    """
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 1)
    batch = max(1, min(batch, LOGITS_BUDGET // (4 * vocab * windows.shape[1])))
    first = 0 if prompt is None else prompt - 1  # the first position whose logits are scored
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch].to(device)
        if prompt is None:
            logits = model(ids).logits[:, :-1].float()
        else:
            with model.wina.context.gating(decode_positions(ids.shape, prompt, device)):
                logits = model(ids).logits[:, first:-1].float()
        targets = ids[:, first + 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(loss)
        count += targets.numel()
    return math.exp(total / count)


def evaluate(
    model: str | os.PathLike | Any,
    *,
    text: str | os.PathLike | None = None,
    sparsity: float | None = None,
    seq_len: int = 512,
    max_tokens: int = DEFAULT_EVAL_TOKENS,
    device: str = "cpu",
    dtype: str | None = None,
    topk: bool = False,
    head_sparsity: float | None = None,
    protocol: str = DEPLOYED,
    prompt_tokens: int | None = None,
    dense_perplexity: float | None = None,
) -> dict[str, Any]:
    """Dense and sparse perplexity of a WINA checkpoint (path, Hub id, or a loaded model).

    ``protocol="deployed"`` (``protocol.py``): each window's first ``prompt_tokens`` (default half the window)
    are a dense prompt and the rest, gated, is scored: the accuracy a user gets from a runtime that runs
    prompts dense and decodes sparse. ``"all-tokens"``: every token gated and scored, as TEAL and WINA measure
    perplexity. Dense and sparse are scored on the same tokens. Returns
    ``dense_perplexity``, ``perplexity``, ``ratio``, ``sparsity`` (parameter-weighted fraction of
    weight columns skipped), ``by_role``, ``per_layer``, ``tokens``, ``target_sparsity``, and the
    decode cost: ``kept_bytes_fraction`` (bytes the gated sub-blocks read per token, shortcut rotations
    included, over their dense bytes: ``1 - sparsity`` asked for, in bytes) and ``bytes_per_token``
    (those bytes plus the dense lm_head and one embedding row; attention's KV cache not counted).
    ``topk`` gates each token's top-k channels per matrix (the paper's protocol) instead of thresholds.
    ``head_sparsity`` gates the output head at that fraction of its columns (None: the checkpoint's; needs
    ``convert --head-sparsity``); ``head_sparsity`` in the result is what it achieved (None: a dense head).
    ``dense_perplexity``: the dense model's, measured before on the same text and protocol (its pass is skipped).
    """
    from transformers import AutoTokenizer

    from ..progress import quiet_transformers
    from ..runtime.load import load

    if isinstance(model, (str, os.PathLike)):
        directory = Path(model)
        net = load(model, sparsity=0, device=device, dtype=dtype)
        source = directory if directory.is_dir() else net.name_or_path
    else:
        net, source = model, model.name_or_path
    control = net.wina
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
    texts, text_name = heldout_texts(text)
    if seq_len < 2:
        raise WinaError("--seq-len must be at least 2")
    windows = eval_windows(tokenizer, texts, seq_len, max_tokens)
    check_protocol(protocol)
    prompt = None
    if protocol == DEPLOYED:
        prompt = windows.shape[1] // 2 if prompt_tokens is None else prompt_tokens
        if not 1 <= prompt < windows.shape[1]:
            raise WinaError(f"--prompt-tokens must be in [1, {windows.shape[1] - 1}] for windows of {windows.shape[1]} tokens, got {prompt}")
    target = control.target_sparsity if sparsity is None else sparsity
    previous, previous_topk, previous_head = control.sparsity, control.topk, control.budget
    previous_prefill = {name: gate.gate_prefill for name, gate in control.gates.items()}
    control.set_gate_prefill(True)  # all-tokens: every position gated (deployed: the position mask decides)
    if head_sparsity is not None:
        control.set_head_sparsity(head_sparsity)
    try:
        control.set_sparsity(0.0)
        dense = perplexity(net, windows, prompt=prompt) if dense_perplexity is None else dense_perplexity
        control.topk = topk
        control.set_sparsity(target)
        control.reset_stats()
        sparse = perplexity(net, windows, prompt=prompt)
        stats = control.stats()
    finally:
        for name, gate in control.gates.items():
            gate.gate_prefill = previous_prefill[name]
        control.topk = previous_topk
        control.budget = previous_head
        control.set_sparsity(previous)
    head = net.get_output_embeddings().weight
    head_stats = stats.get("head")
    head_bytes = head.numel() * head.element_size() if head_stats is None else head_stats["bytes_per_token"]
    ungated = head_bytes + head.shape[-1] * head.element_size()  # the head (kept columns, if gated) + one embedding row
    per_layer: dict[int, float] = {}
    for layer, names in enumerate(control.layers):
        values = [stats["per_gate"][n] for n in names if n in stats["per_gate"]]
        if values:
            weights = [control.gates[n].weight.numel() for n in names if n in stats["per_gate"]]
            per_layer[layer] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    return {
        "dense_perplexity": dense,
        "perplexity": sparse,
        "ratio": sparse / dense,
        "target_sparsity": target,
        "sparsity": stats["sparsity"],
        "by_role": stats["by_role"],
        "per_layer": per_layer,
        "tokens": int(windows[:, (prompt or 1):].numel()),
        "protocol": protocol,
        "prompt_tokens": prompt,
        "text": text_name,
        "topk": topk,
        "kept_bytes_fraction": stats["kept_bytes_fraction"],
        "bytes_per_token": stats["gated_bytes_per_token"] + ungated,
        "head_sparsity": None if head_stats is None else head_stats["sparsity"],
        "head_in_budget": bool(head_stats and head_stats["in_budget"]),
        "weights": _weights(control),
    }


def _weights(control) -> str:
    """What the gated matrices are stored as (``convert --weights``): ``float``, ``int4 (groups of 64 outputs)``, ..."""
    from ..weights import WeightFormat

    config = control.checkpoint_config or {}
    return WeightFormat.from_dict(config.get("wina", {}).get("weights")).describe()
