"""The deployed protocol: one forward with a per-position gate mask equals a dense prefill followed by
gated one-token decode steps through the KV cache; perplexity and zero-shot scoring under it; the
runtime's default (prompts dense, decode sparse) and its counters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import heldout_ids, relative_error
from wina_convert import convert, evaluate, load
from wina_convert.errors import WinaError
from wina_convert.evaluate.perplexity import perplexity
from wina_convert.evaluate.protocol import continuation_positions, decode_positions


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with every default (the output head gated in the budget) and a transformed Qwen2 (shortcuts,
    biases), both calibrated at 0.5."""
    root = tmp_path_factory.mktemp("protocol")
    return {
        "llama": convert(tiny_models["llama"], root / "llama", sparsity=0.5, samples=4, seq_len=64, quiet=True).output,
        "qwen2-transform": convert(tiny_models["qwen2"], root / "qwen2", sparsity=0.5, samples=4, seq_len=64, quiet=True,
                                   transform=True, allocation="greedy").output,
    }


@torch.no_grad()
def step_by_step(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits ``[1, T, vocab]`` of positions ``prompt..L-1``: the prompt in one forward into a KV cache (dense:
    ``gate_prefill`` off), then each later token fed alone (a one-position forward: gated)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids[:, :prompt], past_key_values=cache, use_cache=True)
    steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
             for t in range(prompt, ids.shape[1])]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("case", ["llama", "qwen2-transform"])
def test_position_mask_equals_step_by_step_decode(checkpoints, case):
    directory = checkpoints[case]
    model = load(directory, sparsity=0.5)  # the runtime's default: prompts dense
    assert not any(g.gate_prefill for g in model.wina.gates.values())
    ids = heldout_ids(directory, 40, start=700)
    prompt = 16
    steps = step_by_step(model, ids, prompt)
    model.wina.reset_stats()
    with torch.no_grad(), model.wina.context.gating(decode_positions(ids.shape, prompt)):
        full = model(ids).logits
    err = relative_error(steps, full[:, prompt:])
    assert err < 1e-5, err
    # the masked positions really are gated (not the dense model's logits), the prompt's are dense
    dense_model = load(directory, sparsity=0)
    with torch.no_grad():
        dense = dense_model(ids).logits
    assert relative_error(dense[:, prompt:], full[:, prompt:]) > 1e-3
    assert torch.equal(full[:, :prompt], dense[:, :prompt])
    # only the gated positions are counted, and about half of their inputs were dropped
    tokens = {g.tokens for g in model.wina.gates.values()}
    assert tokens == {ids.shape[1] - prompt}, tokens
    assert 0.3 < model.wina.stats()["sparsity"] < 0.7


def test_position_mask_without_gated_positions_is_dense(checkpoints):
    directory = checkpoints["llama"]
    model = load(directory, sparsity=0.5, gate_prefill=True)  # the mask overrides the runtime's rule
    dense = load(directory, sparsity=0)
    ids = heldout_ids(directory, 24)
    with torch.no_grad(), model.wina.context.gating(torch.zeros(ids.shape, dtype=torch.bool)):
        assert torch.equal(model(ids).logits, dense(ids).logits)
    assert model.wina.context.gated is None  # restored after the block


def test_deployed_perplexity_is_the_step_by_step_loss(checkpoints):
    """evaluate(protocol="deployed") scores each window's second half from the dense first half, gated: the
    loss of the step-by-step decode's logits, computed here from the KV-cache decode."""
    from transformers import AutoTokenizer

    from wina_convert.calibration.text import eval_windows, heldout_texts

    directory = checkpoints["llama"]
    model = load(directory, sparsity=0.5)
    result = evaluate(model, max_tokens=128, seq_len=32)
    assert result["protocol"] == "deployed" and result["prompt_tokens"] == 16
    tok = AutoTokenizer.from_pretrained(directory)
    windows = eval_windows(tok, heldout_texts(None)[0], 32, 128)
    assert result["tokens"] == windows[:, 16:].numel()
    losses = []
    for window in windows:
        ids = window[None]
        with torch.no_grad():
            first = model(ids[:, :16]).logits[:, -1:]  # the prompt's last position predicts the first scored token
        logits = torch.cat([first, step_by_step(model, ids, 16)[:, :-1]], dim=1)
        losses.append(torch.nn.functional.cross_entropy(logits[0].double(), ids[0, 16:], reduction="sum"))
    expected = math.exp(float(sum(losses)) / windows[:, 16:].numel())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    # dense on the same tokens; all-tokens gates and scores everything (a larger gap on this model)
    assert result["dense_perplexity"] == pytest.approx(perplexity(load(directory, sparsity=0), windows, prompt=16), rel=1e-6)
    every = evaluate(model, max_tokens=128, seq_len=32, protocol="all-tokens")
    assert every["protocol"] == "all-tokens" and every["tokens"] == windows[:, 1:].numel()
    assert every["perplexity"] == pytest.approx(perplexity_all_gated(directory, windows), rel=1e-6)
    assert abs(result["sparsity"] - 0.5) < 0.15
    with pytest.raises(WinaError, match="protocol"):
        evaluate(model, max_tokens=128, seq_len=32, protocol="prompt")


def perplexity_all_gated(directory: Path, windows: torch.Tensor) -> float:
    model = load(directory, sparsity=0.5, gate_prefill=True)
    return perplexity(model, windows)


def test_continuation_positions():
    rows = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = continuation_positions(rows, [2, 1], [5, 3])
    assert mask.tolist() == [[False, False, False, True, True], [False, False, True, False, False]]


def test_bench_counts_decode_tokens_with_prompts_dense(checkpoints):
    """``wina bench``'s achieved sparsity counts the decoded tokens only, with the runtime's default."""
    from wina_convert.evaluate.bench import _achieved

    directory = checkpoints["llama"]
    model = load(directory, sparsity=0.5)
    prompt = heldout_ids(directory, 12)
    generated = heldout_ids(directory, 6, start=900)
    sparsity, skipped, head = _achieved(model, model.wina, prompt, generated)
    # independently: one forward of prompt + generated[:-1], gated from the prompt's end, counted there
    model.wina.reset_stats()
    with torch.no_grad(), model.wina.context.gating(decode_positions((1, 17), 12)):
        model(torch.cat([prompt, generated[:, :-1]], dim=1))
    assert {g.tokens for g in model.wina.gates.values()} == {5}
    assert sparsity == pytest.approx(model.wina.stats()["sparsity"], rel=1e-6)
    assert all(not g.gate_prefill for g in model.wina.gates.values())  # left as it was
