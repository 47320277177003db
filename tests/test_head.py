"""The output head's gate (``convert --head-sparsity``): calibrated, recorded, exact when dense, counted apart."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wina_convert import convert, load
from wina_convert.errors import WinaError
from wina_convert.evaluate.perplexity import evaluate
from wina_convert.runtime.graphs import greedy
from wina_convert.runtime.kernels.hook import bind_kernels, input_groups
from wina_convert.arch import adapter_for
from wina_convert.runtime.modules import GatedLinear


@pytest.fixture(scope="module")
def headed(tiny_models, tmp_path_factory):
    """family -> (checkpoint with the head gated at 0.5, the same conversion without it)."""
    root = tmp_path_factory.mktemp("head")
    out = {}
    for family in ("llama", "qwen2"):
        with_head, plain = root / f"{family}-head", root / family
        convert(tiny_models[family], with_head, sparsity=0.5, head_sparsity=0.5, quiet=True, samples=4, seq_len=64)
        convert(tiny_models[family], plain, sparsity=0.5, head_sparsity=0.0, quiet=True, samples=4, seq_len=64)
        out[family] = (with_head, plain)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_gate_is_calibrated_and_recorded(headed, family):
    path, plain = headed[family]
    wina = json.loads((path / "config.json").read_text())["wina"]
    assert wina["head_sparsity"] == 0.5
    model = load(path, gate_prefill=True)
    assert model.wina.head == "lm_head" and isinstance(model.lm_head, GatedLinear)
    assert model.wina.budget.head_sparsity == 0.5 and model.lm_head.active
    table = model.wina.tables["lm_head"]
    assert table.quantiles.shape == (1, 201) and (table.quantiles.diff(dim=-1) >= 0).all()
    # the layers' gates are the plain conversion's (the head is calibrated after them, on their output)
    ref = load(plain, gate_prefill=True)
    assert ref.wina.head is None and not isinstance(ref.lm_head, GatedLinear)
    for name, gate in ref.wina.gates.items():
        assert torch.equal(gate.thresholds, model.wina.gates[name].thresholds)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_gate_skips_its_bytes_and_is_dense_at_zero(headed, family):
    """On held-out text the head skips about its target of columns, bytes per token fall by those columns'
    bytes, the layers' sparsity is unchanged, and the model at sparsity 0 (head dense too) is the original."""
    path, plain = headed[family]
    gated = evaluate(path, max_tokens=1024, seq_len=64)
    dense_head = evaluate(path, max_tokens=1024, seq_len=64, head_sparsity=0.0)
    plain_eval = evaluate(plain, max_tokens=1024, seq_len=64)
    assert gated["head_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert dense_head["head_sparsity"] == 0.0 and plain_eval["head_sparsity"] is None
    model = load(path, gate_prefill=True)
    head = model.lm_head.weight
    skipped = gated["head_sparsity"] * head.numel() * head.element_size()
    assert dense_head["bytes_per_token"] - gated["bytes_per_token"] == pytest.approx(skipped, rel=0.05)
    assert dense_head["bytes_per_token"] == pytest.approx(plain_eval["bytes_per_token"], rel=1e-6)
    assert gated["sparsity"] == pytest.approx(plain_eval["sparsity"], abs=1e-9)  # the layers read the same
    assert dense_head["perplexity"] == pytest.approx(plain_eval["perplexity"], rel=1e-6)
    assert gated["perplexity"] != dense_head["perplexity"]
    assert gated["dense_perplexity"] == pytest.approx(plain_eval["dense_perplexity"], rel=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    model.wina.set_sparsity(0.0)
    assert not model.lm_head.active
    original = load(plain, sparsity=0.0, gate_prefill=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_head_sparsity_at_load_time_and_refusals(headed):
    path, plain = headed["llama"]
    model = load(path, head_sparsity=0.3, gate_prefill=True)
    assert model.wina.budget.head_sparsity == 0.3
    low = model.lm_head.thresholds.clone()
    model.wina.set_head_sparsity(0.6)
    assert (model.lm_head.thresholds >= low).all() and (model.lm_head.thresholds > low).any()
    with pytest.raises(WinaError, match="head sparsity must be a number in"):
        model.wina.set_head_sparsity(0.95)
    ref = load(plain, head_sparsity=0, gate_prefill=True)
    with pytest.raises(WinaError, match="not calibrated: convert it with --head-sparsity"):
        ref.wina.set_head_sparsity(0.3)
    with pytest.raises(WinaError, match="--head-sparsity must be a number"):
        convert(path, path.parent / "never", head_sparsity=1.5, quiet=True)
    with pytest.raises(WinaError, match="drop --no-calibrate"):
        convert(path, path.parent / "never", head_sparsity=0.3, calibrate=False, quiet=True)
    assert not (path.parent / "never").exists()


def test_head_gate_survives_save_and_load(headed, tmp_path):
    path, _ = headed["qwen2"]
    model = load(path, head_sparsity=0.4, gate_prefill=True)
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again", head_sparsity=0.4, gate_prefill=True)
    assert again.wina.head == "lm_head"
    torch.testing.assert_close(again.lm_head.thresholds, model.lm_head.thresholds)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy(again, ids, 6), greedy(model, ids, 6))


def test_head_gate_through_the_kernel_hooks(headed):
    """The head is bound as a group of its own; a decode through the hooks equals the masking reference."""
    path, _ = headed["llama"]
    model, ref = load(path, gate_prefill=True), load(path, gate_prefill=True)
    groups = bind_kernels(model.wina, input_groups(adapter_for("llama"), model.config.num_hidden_layers))
    assert any(g.gates == [model.lm_head] for g in groups)
    for gate in model.wina.gates.values():
        gate.counting = False
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy(model, ids, 8), greedy(ref, ids, 8))


def test_inspect_shows_the_head_and_its_bytes(headed):
    """``wina inspect`` reports the head's sparsity and plans its kept columns into bytes per token."""
    from wina_convert.evaluate.inspect import describe

    path, plain = headed["llama"]
    gated, dense = describe(path), describe(plain)
    assert gated["head_sparsity"] == 0.5 and dense["head_sparsity"] == 0.0
    model = load(path, gate_prefill=True)
    head = model.lm_head.weight
    assert dense["bytes_per_token"] - gated["bytes_per_token"] == pytest.approx(0.5 * head.numel() * head.element_size())
    assert gated["kept_bytes_fraction"] == dense["kept_bytes_fraction"]


def test_model_card_says_the_head_is_gated(headed):
    path, plain = headed["llama"]
    assert "| output head | gated too: 50.0 % of its columns skipped |" in (path / "README.md").read_text()
    assert "output head" not in (plain / "README.md").read_text()


def test_bad_head_inputs_are_one_line_errors(headed, tmp_path, capsys):
    """The CLI refuses a head sparsity out of range (convert and eval) in one line; a sidecar that names a head gate
    but lacks its table (edited, manifest rewritten) is refused at load."""
    import shutil

    from tests.helpers import assert_one_line_error, run

    from wina_convert.checkpoint.format import SIDECAR, read_sidecar, write_manifest, write_sidecar

    path, _ = headed["llama"]
    code, _, err = run(capsys, "convert", path, "-o", tmp_path / "never", "--head-sparsity", "1.5")
    assert_one_line_error(code, err, "--head-sparsity")
    code, _, err = run(capsys, "eval", path, "--head-sparsity", "abc")
    assert_one_line_error(code, err, "--head-sparsity")
    assert not (tmp_path / "never").exists()
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    tensors, meta = read_sidecar(edited / SIDECAR)
    del tensors["lm_head.quantiles"]
    write_sidecar(edited / SIDECAR, tensors, meta)
    write_manifest(edited)
    with pytest.raises(WinaError, match="output head's gate .* is missing"):
        load(edited, gate_prefill=True)


# --------------------------------------------------------------------------- the head inside the budget (auto)


@pytest.fixture(scope="module")
def budgeted(tiny_models, tmp_path_factory):
    """family -> checkpoint with the head's share of the bytes searched (``--head-sparsity auto``) at 0.5: the
    default for llama (no head option given), named for qwen2."""
    root = tmp_path_factory.mktemp("head-auto")
    out = {}
    for family in ("llama", "qwen2"):
        out[family] = root / family
        named = {} if family == "llama" else {"head_sparsity": "auto"}
        convert(tiny_models[family], out[family], sparsity=0.5, quiet=True, samples=4, seq_len=64, **named)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_auto_head_share_is_searched_and_recorded(budgeted, family):
    from wina_convert.calibration.search import HEAD_SHARES

    path = budgeted[family]
    wina = json.loads((path / "config.json").read_text())["wina"]
    report = wina["calibration"]["head"]
    assert {f"{s:g}" for s in HEAD_SHARES if s * 0.5 <= 0.9} <= set(report["shares"])  # a dense head (0) among them
    best = min(report["shares"].values())
    assert report["kl"] == best and report["shares"][f"{report['share']:g}"] == best
    assert wina["head_share"] == report["share"]
    assert wina["head_sparsity"] == pytest.approx(min(report["share"] * 0.5, 0.9))
    model = load(path, gate_prefill=True)
    assert model.wina.budget.head_share == report["share"] and model.wina.head == "lm_head"
    assert model.wina.budget.head_level_scale == pytest.approx(report["level_scale"])


def test_in_budget_head_pays_for_the_layers_bytes(budgeted):
    """At any sparsity, what the head skips (its level times its size) is what the layers' levels give up, times
    the measured level scale: the model plans the same skipped bytes as the layers alone at that sparsity."""
    model = load(budgeted["llama"], gate_prefill=True)
    ctl = model.wina
    ctl.budget = ctl.budget.with_head(share=0.8)
    gated = sum(ctl.gated_bytes)
    head_bytes = model.lm_head.weight_bytes
    for s in (0.2, 0.5, 0.7):
        layers = sum(ctl.matrix_level(layer, s) * params for layer, params in enumerate(ctl.gated_bytes))
        assert ctl.head_level(s) == pytest.approx(0.8 * s)
        assert layers + ctl.head_level(s) * head_bytes == pytest.approx(s * gated)
    ctl.budget = ctl.budget.with_head(share=0.8, level_scale=1.1)
    assert ctl.matrix_level(0, 0.5) == pytest.approx(1.1 * (0.5 - 0.4 * head_bytes / gated))
    assert ctl.head_level(0.0) == 0.0 and ctl.matrix_level(0, 0.0) == 0.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_in_budget_head_reads_the_targets_bytes_and_is_dense_at_zero(budgeted, tiny_models, family):
    """On held-out text the model skips about the target's bytes (net of the head's saving), the layers less than
    the target when the head helps; sparsity 0 is the original model exactly."""
    path = budgeted[family]
    result = evaluate(path, max_tokens=1024, seq_len=64)
    assert result["head_in_budget"]
    assert 1.0 - result["kept_bytes_fraction"] == pytest.approx(0.5, abs=0.06)
    model = load(path, gate_prefill=True)
    share = model.wina.budget.head_share
    head = model.lm_head.weight
    if share > 0:
        assert result["head_sparsity"] > 0 and result["sparsity"] < 0.5
    layer_bytes = sum(g.weight.numel() * g.weight.element_size() for n, g in model.wina.gates.items() if n != "lm_head")
    head_dense = head.numel() * head.element_size()
    kept_layers = result["kept_bytes_fraction"] * layer_bytes + result["head_sparsity"] * head_dense
    embed_row = head.shape[-1] * head.element_size()
    assert result["bytes_per_token"] == pytest.approx(kept_layers + (1 - result["head_sparsity"]) * head_dense + embed_row, rel=1e-6)
    model.wina.set_sparsity(0.0)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_fixed_head_sparsity_takes_the_head_out_of_the_budget(budgeted):
    """``set_head_sparsity`` (or ``load(head_sparsity=)``) puts the head on top: the layers go back to the target."""
    model = load(budgeted["llama"], gate_prefill=True)
    ctl = model.wina
    ctl.use_budget(ctl.budget.with_head(share=0.8))  # whatever was searched, a share that helps
    ctl.set_sparsity(0.5)
    assert ctl.matrix_level(0, 0.5) < 0.5
    ctl.set_head_sparsity(0.3)
    assert ctl.budget.head_share is None and ctl.head_level(0.5) == 0.3
    assert ctl.matrix_level(0, 0.5) == pytest.approx(0.5 + sum(ctl.extra_bytes) / sum(ctl.gated_bytes))
    assert load(budgeted["llama"], head_sparsity=0.3, gate_prefill=True).wina.budget.head_share is None


def test_in_budget_head_in_inspect_card_and_round_trip(budgeted, tmp_path):
    from wina_convert.evaluate.inspect import describe

    path = budgeted["qwen2"]
    info = describe(path)
    model = load(path, gate_prefill=True)
    assert info["head_in_budget"] and info["head_sparsity"] == pytest.approx(model.wina.head_level(0.5))
    assert info["kept_bytes_fraction"] == pytest.approx(0.5, abs=0.02)
    card = (path / "README.md").read_text()
    if info["head_sparsity"] > 0:
        assert "gated inside the target's bytes" in card
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again", gate_prefill=True)
    assert again.wina.budget.head_share == model.wina.budget.head_share
    assert again.wina.budget.head_level_scale == model.wina.budget.head_level_scale
    torch.testing.assert_close(again.lm_head.thresholds, model.lm_head.thresholds)


def test_auto_head_without_calibration_is_dense_and_refusals(budgeted, tiny_models, tmp_path, capsys):
    """``auto`` (the default) has nothing to search without calibration text: a dense head, not an error."""
    from tests.helpers import assert_one_line_error, run

    path = budgeted["llama"]
    out = convert(tiny_models["llama"], tmp_path / "uncalibrated", calibrate=False, quiet=True).output
    wina = json.loads((out / "config.json").read_text())["wina"]
    assert wina["head_sparsity"] == 0.0 and wina["head_share"] is None and wina["head"] is None
    assert load(out, gate_prefill=True).wina.head is None
    code, _, err = run(capsys, "convert", path, "-o", tmp_path / "never", "--head-sparsity", "automatic")
    assert_one_line_error(code, err, "--head-sparsity")
    assert not (tmp_path / "never").exists()
