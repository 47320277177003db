"""The deployed protocol: one forward with a per-position gate mask equals a dense prefill followed by
gated one-token decode steps through the KV cache; perplexity and zero-shot scoring under it; the
runtime's default (prompts dense, decode sparse) and its counters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import heldout_ids, relative_error
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


def test_prompt_forward_is_dense_including_the_head(checkpoints):
    """With prompts dense (the default), the first generated token comes from a dense forward: the gated output
    head too, although ``generate`` computes the prompt's logits at its last position only (one row, like a
    decode step); the second token's step is gated."""
    directory = checkpoints["llama"]
    model, dense = load(directory, sparsity=0.5), load(directory, sparsity=0)
    assert model.wina.head is not None and model.wina.head_level(0.5) > 0  # the default: a gated head in the budget
    ids = heldout_ids(directory, 20)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        out, ref = model.generate(ids, **kw), dense.generate(ids, **kw)
    assert relative_error(ref.logits[0], out.logits[0]) < 1e-6
    assert relative_error(ref.logits[1], out.logits[1]) > 1e-3


@torch.no_grad()
def deployed_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as a generation computes it: the context into a KV cache (dense), the
    continuation's tokens fed one at a time (gated), tokenized as lm-eval does (context+continuation as one text)."""
    context_ids = tok(context)["input_ids"]
    whole = torch.tensor([tok(context + continuation)["input_ids"]])
    n = len(context_ids)
    first = model(whole[:, :n]).logits[:, -1:]
    logits = torch.cat([first, step_by_step(model, whole[:, : -1], n)], dim=1) if whole.shape[1] - 1 > n else first
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    return float(logprobs[torch.arange(whole.shape[1] - n), whole[0, n:]].sum())


def test_deployed_task_scores_equal_a_real_generation(checkpoints, tmp_path):
    """``evaluate_tasks(protocol="deployed")``: each choice's log-likelihood is that of a dense context and a
    continuation decoded token by token through the KV cache (computed here, without the position mask)."""
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
    from transformers import AutoTokenizer

    from tests.helpers import PIQA, WINO, write_tiny_taskdata
    from wina_convert.evaluate.tasks import evaluate_tasks

    directory = checkpoints["llama"]
    data = write_tiny_taskdata(tmp_path / "eval-data")
    model = load(directory, sparsity=0)
    tok = AutoTokenizer.from_pretrained(directory)
    result = evaluate_tasks(model, "piqa,winogrande", data=data, loglikelihoods=True, batch_size=3)
    assert result["protocol"] == "deployed"
    model.wina.set_sparsity(0.5)
    piqa = [[deployed_loglikelihood(model, tok, f"Question: {goal}\nAnswer:", " " + c)
             for c in ([right, wrong] if i % 2 == 0 else [wrong, right])] for i, (goal, right, wrong) in enumerate(PIQA)]
    wino = []
    for sentence, a, b, _ in WINO:
        cut = sentence.index("_")
        wino.append([deployed_loglikelihood(model, tok, sentence[:cut] + option, " " + sentence[cut + 1:].strip())
                     for option in (a, b)])
    for task, ours in (("piqa", piqa), ("winogrande", wino)):
        got = torch.tensor(result["sparse"][task]["loglikelihoods"], dtype=torch.float64)
        assert torch.allclose(got, torch.tensor(ours, dtype=torch.float64), rtol=1e-4, atol=1e-4), task
    # the context is dense, so a one-token continuation scores as dense; longer ones differ
    dense = torch.tensor(result["dense"]["piqa"]["loglikelihoods"], dtype=torch.float64)
    assert not torch.allclose(dense, torch.tensor(piqa, dtype=torch.float64), atol=1e-3)
    assert abs(result["sparsity"] - 0.5) < 0.2


def test_gsm8k_runs_generation_with_the_prompt_dense(checkpoints, tmp_path):
    """The generative task end to end on a tiny local GSM8K split (lm-eval's stock gsm8k-cot config: 8 exemplars in
    the config, greedy until a stop sequence), under both protocols: scores and counts are well formed, and under
    ``deployed`` only generated tokens are counted (fewer than the prompts' positions)."""
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
    import datasets

    from wina_convert.evaluate.tasks import evaluate_tasks

    root = tmp_path / "eval-data"
    datasets.Dataset.from_dict({"question": ["Tom has 3 apples and buys 2 more. How many apples does he have?",
                                             "A box holds 4 pens. How many pens are in 2 boxes?"],
                                "answer": ["3 + 2 = 5\n#### 5", "4 * 2 = 8\n#### 8"]}).save_to_disk(str(root / "gsm8k_cot" / "test"))
    (root / "manifest.json").write_text('{"version": 2}')
    model = load(checkpoints["llama"], sparsity=0)
    counted = {}
    for protocol in ("deployed", "all-tokens"):
        result = evaluate_tasks(model, "gsm8k_cot", data=root, protocol=protocol, dense=False)
        row = result["sparse"]["gsm8k_cot"]
        assert row["samples"] == 2 and 0 <= row["acc"] <= 1 and 0 <= row["flexible"] <= 1
        assert result["protocol"] == protocol and 0.2 < result["sparsity"] < 0.8
        counted[protocol] = next(iter(model.wina.gates.values())).tokens
    assert 0 < counted["deployed"] < counted["all-tokens"]
    assert not any(g.gate_prefill for g in model.wina.gates.values())  # restored
