"""``--allocation output`` (calibration/search.py): layers' levels searched by the model's divergence from dense.

Checked on tiny random models: the searched checkpoint is exact at sparsity 0, records a whole-model
allocation that keeps the model's level, hits its byte target on text, and the replay of unchanged
layers (the search's shortcut) gives the divergence a full run gives.
"""

from __future__ import annotations

import json

import pytest
import torch

from wina_convert import convert, load
from wina_convert.calibration.search import BETAS, _Divergence, balanced, search_layer_levels
from wina_convert.evaluate.perplexity import evaluate

CAL = dict(samples=4, seq_len=64, quiet=True)


def test_balanced_keeps_the_weighted_mean_and_the_bounds():
    ratios = torch.tensor([0.2, 1.0, 1.9, 3.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    for level in (0.05, 0.3, 0.5, 0.85):
        levels = balanced(ratios, weights, level)
        assert float((levels * weights).sum() / weights.sum()) == pytest.approx(level, abs=1e-6)
        assert float(levels.min()) >= 0.0 and float(levels.max()) <= 0.9 + 1e-12
    assert torch.equal(balanced(ratios, weights, 0.0), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_output_allocation_is_exact_at_zero_and_hits_the_target(tiny_models, tmp_path, family):
    out = convert(tiny_models[family], tmp_path / "out", sparsity=0.5, allocation="output", **CAL)
    config = json.loads((out.output / "config.json").read_text())
    search = config["wina"]["calibration"]["search"]
    assert config["wina"]["calibration"]["allocation"] == "output"
    assert search["beta"] in (0.0, 0.0125, 0.025, 0.0375, 0.05, 0.075)
    assert len(search["layer_levels"]) == 3
    model = load(out.output, sparsity=0.5, gate_prefill=True)
    assert model.wina.budget.scope == "model"
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    model.wina.set_sparsity(0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    ev = evaluate(out.output, max_tokens=1024, seq_len=128)
    assert abs(ev["sparsity"] - 0.5) < 0.05, ev["sparsity"]
    # the stored allocation spans every level: lower and higher sparsities stay ordered
    model.wina.set_sparsity(0.3)
    low = model.wina.gate_sparsities(0.3)
    high = model.wina.gate_sparsities(0.7)
    assert all((high[n] >= low[n] - 1e-9).all() for n in low)


def test_replayed_layers_give_the_full_runs_divergence(tiny_models, tmp_path):
    out = convert(tiny_models["llama"], tmp_path / "out", sparsity=0.5, **CAL)
    model = load(out.output, sparsity=0.5, gate_prefill=True)
    ctl = model.wina
    ctl.set_counting(False)
    tokens = torch.randint(0, model.config.vocab_size, (2, 48))
    div = _Divergence(model, tokens, model.get_submodule(ctl.layers_prefix))
    try:
        ctl.set_sparsity(0.0)
        div.record_dense()
        ctl.set_sparsity(0.5)
        base = div(record=True)
        assert base > 0
        # raise the last layer only: layers 0 and 1 are replayed from the recorded run
        sparsities = {**ctl.gate_sparsities(0.5), **ctl.layer_sparsities(2, 0.8)}
        ctl.set_gate_sparsities(sparsities)
        replayed, full = div(start=2), div(start=0)
        assert replayed == pytest.approx(full, rel=1e-6)
        assert full != pytest.approx(base, rel=1e-3)  # the probe changed something
    finally:
        div.close()


def test_search_report_and_errors(tiny_models, tmp_path):
    out = convert(tiny_models["llama"], tmp_path / "out", sparsity=0.5, **CAL)
    model = load(out.output, sparsity=0.5, gate_prefill=True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    allocation, report = search_layer_levels(model, tokens, 0.5, model.wina.layers_prefix)
    assert len(allocation) == 3 and all(a.shape[0] == 37 for a in allocation)
    assert set(report["by_role"]) >= {"q_proj", "down_proj"}
    # the default allocation: without calibration (or at sparsity 0) there is nothing to search, and no error
    plain = convert(tiny_models["llama"], tmp_path / "nocal", sparsity=0.5, allocation="output", calibrate=False, quiet=True)
    assert json.loads((plain.output / "config.json").read_text())["wina"]["calibration"] is None


def test_search_tokens_are_whole_windows_recorded_and_checked(tiny_models, tmp_path, capsys):
    from tests.helpers import assert_one_line_error, run

    from wina_convert import WinaError

    out = convert(tiny_models["llama"], tmp_path / "out", sparsity=0.5, **CAL)
    model = load(out.output, sparsity=0.5, gate_prefill=True)
    tokens = torch.randint(0, model.config.vocab_size, (4, 64))
    for asked, used in ((1, 64), (64, 64), (130, 128), (10_000, 256)):
        _, report = search_layer_levels(model, tokens, 0.5, model.wina.layers_prefix, asked)
        assert report["search_tokens"] == used
    searched = convert(tiny_models["llama"], tmp_path / "searched", sparsity=0.5, search_tokens=128, **CAL)
    assert json.loads((searched.output / "config.json").read_text())["wina"]["calibration"]["search"]["search_tokens"] == 128
    with pytest.raises(WinaError, match="--search-tokens"):
        convert(tiny_models["llama"], tmp_path / "bad", sparsity=0.5, search_tokens=0, **CAL)
    code, _, err = run(capsys, "convert", tiny_models["llama"], "-o", tmp_path / "cli", "--search-tokens", "0", "-q")
    assert_one_line_error(code, err, "--search-tokens")
    assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())


def _kl_per_token(model, tokens: torch.Tensor, dense: list[torch.Tensor]) -> float:
    """KL(dense || model) of the next-token distributions (float32, as the search computes them), summed over every
    position and divided by their count, each row a full forward of the whole model (no layer replayed)."""
    total = 0.0
    with torch.no_grad():
        for row, want in zip(tokens, dense):
            logp = torch.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), dim=-1)
            total += float((want.exp() * (want - logp)).sum())
    return total / tokens.numel()


def test_search_chooses_the_least_divergence_measured_independently(tiny_models, tmp_path, monkeypatch):
    """Every divergence the search measured (probes and candidates, with the layers below a probe replayed) is
    measured again here by full forwards of the whole model at the same gate sparsities; they agree, the candidates
    differ, and the beta chosen is the candidate whose independently measured divergence is least."""
    out = convert(tiny_models["llama"], tmp_path / "out", sparsity=0.5, allocation="greedy", head_sparsity=0.0, **CAL)
    model = load(out.output, sparsity=0.5, gate_prefill=True)
    ctl = model.wina
    ctl.set_counting(False)
    tokens = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(7))

    # record what the search measured: the gate sparsities set last, and the divergence it computed there
    measured: list[tuple[dict[str, torch.Tensor], float, int]] = []
    current: dict[str, torch.Tensor] = {}
    set_gates, divergence = ctl.set_gate_sparsities, _Divergence.__call__

    def recording_set(sparsities):
        current.update({name: s.clone() for name, s in sparsities.items()})
        return set_gates(sparsities)

    def recording_call(self, start=0, record=False):
        kl = divergence(self, start, record)
        measured.append((dict(current), kl, start))
        return kl

    monkeypatch.setattr(ctl, "set_gate_sparsities", recording_set)
    monkeypatch.setattr(_Divergence, "__call__", recording_call)
    _, report = search_layer_levels(model, tokens, 0.5, ctl.layers_prefix, search_tokens=tokens.numel())
    monkeypatch.undo()
    layers = len(report["sensitivity"])
    assert len(measured) == 1 + layers + len(BETAS)  # the base run, one probe per layer, the candidates
    assert [start for _, _, start in measured[1 : 1 + layers]] == list(range(layers))  # probes replay the layers below

    ctl.set_gate_sparsities(ctl.gate_sparsities(0.0))
    with torch.no_grad():
        dense = [torch.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), dim=-1)
                 for row in tokens]
    again = []
    for sparsities, kl, _ in measured:
        ctl.set_gate_sparsities(sparsities)
        again.append(_kl_per_token(model, tokens, dense))
        assert kl == pytest.approx(again[-1], rel=1e-5), (kl, again[-1])
    candidates = dict(zip((f"{beta:g}" for beta in BETAS), again[1 + layers :]))
    assert max(candidates.values()) > 1.005 * min(candidates.values()), candidates  # the candidates are told apart
    chosen = candidates[f"{report['beta']:g}"]
    assert chosen <= min(candidates.values()) * (1 + 1e-6), (report["beta"], candidates)
    assert report["kl"] == pytest.approx(chosen, abs=6e-7)  # the report rounds to 6 decimals
