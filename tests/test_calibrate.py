"""Calibration: sources, token windows, quantile tables, allocations, WINA vs TEAL thresholds."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ROOT
from wina_convert import WinaError, convert, load
from wina_convert.calibration.text import eval_windows, leading_bos, token_windows
from wina_convert.gate import ALLOCATION_LEVELS

SAMPLES, SEQ = 4, 64


def _convert(model, out, **kw):
    return convert(model, out, sparsity=kw.pop("sparsity", 0.5), samples=kw.pop("samples", SAMPLES),
                   seq_len=kw.pop("seq_len", SEQ), quiet=True, **kw)


def _calibration_meta(out) -> dict:
    return json.loads((out / "config.json").read_text())["wina"]["calibration"]


def test_token_windows_are_slices_of_the_stream_shuffled_by_seed(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "wina_convert" / "calibration" / "data" / "train").glob("*.txt"))][:2]
    a = token_windows(tok, texts, 8, 32, seed=0)
    assert a.shape == (8, 32)
    assert torch.equal(a, token_windows(tok, texts, 8, 32, seed=0))
    assert not torch.equal(a, token_windows(tok, texts, 8, 32, seed=1))
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = {tuple(stream[i * 32 : (i + 1) * 32]) for i in range(len(stream) // 32)}
    assert all(tuple(row.tolist()) in windows for row in a)
    assert len({tuple(row.tolist()) for row in a}) == 8  # distinct windows
    assert leading_bos(tok) is None  # this tokenizer adds nothing: its windows are pure stream


def _stream(tok, texts) -> list[int]:
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return stream


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tiny_bos_tokenizer_dir, tiny_tokenizer_dir):
    """A tokenizer that starts every text with BOS (Gemma, Llama 3) gets calibration and evaluation windows
    that do too: BOS, then seq_len - 1 stream tokens; one that adds nothing gets stream tokens only."""
    from transformers import AutoTokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "wina_convert" / "calibration" / "data" / "train").glob("*.txt"))][:2]
    tok = AutoTokenizer.from_pretrained(tiny_bos_tokenizer_dir)
    bos = tok.convert_tokens_to_ids("<bos>")
    assert tok("The river")["input_ids"][0] == bos and leading_bos(tok) == bos
    stream = _stream(tok, texts)
    assert bos not in stream
    a = token_windows(tok, texts, 8, 32, seed=0)
    assert a.shape == (8, 32) and (a[:, 0] == bos).all()
    bodies = {tuple(stream[i * 31 : (i + 1) * 31]) for i in range(len(stream) // 31)}
    assert all(tuple(row[1:].tolist()) in bodies for row in a)
    e = eval_windows(tok, texts, 32, 310)
    assert e.shape == (10, 32) and (e[:, 0] == bos).all()
    assert e[:, 1:].reshape(-1).tolist() == stream[:310], "consecutive: every text token predicted once"

    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    e = eval_windows(plain, texts, 32, 320)
    assert e.reshape(-1).tolist() == _stream(plain, texts)[:320]


def test_sources_txt_jsonl_and_directory(tiny_models, tmp_path):
    model = tiny_models["llama"]
    prose = (ROOT / "wina_convert" / "calibration" / "data" / "train" / "prose.txt").read_text(encoding="utf-8")
    txt = tmp_path / "text.txt"
    txt.write_text(prose, encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(prose.split("\n\n"))) + "\n",
                     encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(prose, encoding="utf-8")
    (folder / "b.jsonl").write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    sidecars = []
    for i, spec in enumerate((txt, jsonl, folder)):
        out = _convert(model, tmp_path / f"out{i}", calibration=str(spec), seed=3).output
        meta = _calibration_meta(out)
        assert meta["dataset"] == str(spec)
        assert (meta["samples"], meta["seq_len"], meta["seed"], meta["allocation"]) == (SAMPLES, SEQ, 3, "output")  # the default
        sidecars.append((out / "wina.safetensors").read_bytes())
    assert len(set(sidecars)) == 3  # the text calibrated on changes the thresholds


def test_jsonl_without_text_field_is_refused(tiny_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field here"}\n', encoding="utf-8")
    with pytest.raises(WinaError, match="'text' field"):
        _convert(tiny_models["llama"], tmp_path / "out", calibration=str(bad))
    assert not (tmp_path / "out").exists()


def test_hub_dataset_without_network_or_datasets_is_one_clear_error(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(WinaError, match="datasets|cannot load dataset"):
        _convert(tiny_models["llama"], tmp_path / "out", calibration="hf:wikitext:wikitext-2-raw-v1:train")


def test_self_calibration_is_offline_and_recorded(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _convert(tiny_models["qwen3"], tmp_path / "out", calibration="self", samples=2, seq_len=32).output
    meta = _calibration_meta(out)
    assert meta["dataset"] == "self" and meta["samples"] == 2 and meta["seq_len"] == 32
    model = load(out, gate_prefill=True)
    assert model.wina.sparsity == pytest.approx(0.5)


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    cases = {"greedy": {"allocation": "greedy"}, "uniform": {"allocation": "uniform"}, "teal": {"method": "teal", "allocation": "uniform"}}
    # a dense output head: every layer is then at the target (the in-budget head, the default, is test_head.py's)
    return {name: _convert(tiny_models["mistral"], root / name, head_sparsity=0.0, **kw).output for name, kw in cases.items()}


def _weighted(model, per_gate: dict[str, torch.Tensor], layer: int) -> float:
    total = weight = 0.0
    for name in model.wina.layers[layer]:
        gate = model.wina.gates[name]
        for p, size in enumerate(gate.splits):
            total += float(per_gate[name][p]) * size * gate.in_features
            weight += size * gate.in_features
    return total / weight


@pytest.mark.parametrize("case", ["greedy", "uniform"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65, 0.9])
def test_every_layer_is_at_the_parameter_weighted_target(calibrated, case, sparsity):
    model = load(calibrated[case], gate_prefill=True)
    per_gate = model.wina.gate_sparsities(sparsity)
    for layer in range(model.config.num_hidden_layers):
        assert _weighted(model, per_gate, layer) == pytest.approx(sparsity, abs=0.01)
    values = torch.cat([per_gate[n] for n in model.wina.layers[0]])
    if case == "uniform":  # every matrix at the target, save those with inputs that are zero for free
        assert (values >= sparsity - 1e-6).all()
    else:  # greedy spreads it: some matrices above the target, some below
        assert values.max() > sparsity + 0.02 and values.min() < sparsity - 0.02


def test_allocation_table_is_monotone(calibrated):
    from safetensors.torch import load_file

    tensors = load_file(calibrated["greedy"] / "wina.safetensors")
    tables = [t for k, t in tensors.items() if k.endswith(".allocation")]
    assert tables and all(t.shape[0] == len(ALLOCATION_LEVELS) for t in tables)
    for t in tables:
        assert (t.diff(dim=0) >= -1e-6).all(), "a matrix's sparsity never falls as the layer's rises"


def test_wina_thresholds_scale_with_column_norms_teal_ones_do_not(calibrated):
    for case, wina in (("uniform", True), ("teal", False)):
        model = load(calibrated[case], sparsity=0.5, gate_prefill=True)
        gate = model.wina.gates["model.layers.1.mlp.down_proj"]
        norms = model.wina.tables["model.layers.1.mlp.down_proj"].column_norms[0]
        t = gate.thresholds[0]
        assert norms.std() > 0.01 * norms.mean()
        scores = t * norms if wina else t  # the per-matrix score threshold: one number per matrix
        assert torch.allclose(scores, scores[0].expand_as(scores), rtol=1e-4), case


def test_quantile_tables_give_any_sparsity_on_the_calibration_text(calibrated, tiny_models):
    """On text of the kind calibrated on, the achieved sparsity follows the requested one."""
    from transformers import AutoTokenizer

    model = load(calibrated["uniform"], gate_prefill=True)
    tok = AutoTokenizer.from_pretrained(calibrated["uniform"])
    text = (ROOT / "wina_convert" / "calibration" / "data" / "train" / "technical.txt").read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt")["input_ids"][:, : 4 * SEQ].reshape(4, SEQ)
    for sparsity in (0.25, 0.5):
        model.wina.set_sparsity(sparsity)
        model.wina.reset_stats()
        with torch.no_grad():
            model(ids)
        assert model.wina.stats()["sparsity"] == pytest.approx(sparsity, abs=0.05), sparsity


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_error_curves_replaying_unchanged_linears_change_nothing(tiny_models, tiny_gemma3, tmp_path, monkeypatch, family):
    """The greedy curves replay the dense outputs of a sub-block's ungated input linears (k/v for q's
    curve, up for gate's): the allocation is the one recomputing them gives."""
    import contextlib

    from safetensors.torch import load_file

    import wina_convert.calibration.calibrator as calibrator
    from wina_convert.checkpoint.format import SIDECAR

    model = tiny_gemma3 if family == "gemma3_text" else tiny_models[family]
    replayed = _convert(model, tmp_path / "replayed", allocation="greedy")
    calls = []

    @contextlib.contextmanager
    def recompute(layer, outputs):
        calls.append(sorted(outputs))
        yield

    monkeypatch.setattr(calibrator, "_replayed", recompute)
    recomputed = _convert(model, tmp_path / "recomputed", allocation="greedy")
    assert any(calls) and all(len(c) >= 1 for c in calls)  # every input linear's curve had siblings to replay
    a, b = load_file(replayed.output / SIDECAR), load_file(recomputed.output / SIDECAR)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
