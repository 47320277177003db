"""The runtime: sparse outputs equal an independent masked reference; batching, prefill, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import build_tiny, heldout_ids as _ids, relative_error as _rel
from tests.reference import reference_model, sidecar_tensors
from wina_convert import convert, evaluate, load
from wina_convert.checkpoint.format import write_manifest
from wina_convert.errors import WinaError

# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrated")
    cases = {
        "llama": dict(transform=True),
        "llama-plain": dict(transform=False),
        "phi3": dict(transform=True),
        "qwen2-teal": dict(transform=True, method="teal", allocation="uniform"),
    }
    return {
        case: convert(tiny_models[case.split("-")[0]], root / case, sparsity=0.5, samples=4, seq_len=64, quiet=True, **kw).output
        for case, kw in cases.items()
    }


# --------------------------------------------------------------------------- sparse == reference

@pytest.mark.parametrize("case", ["llama", "llama-plain", "phi3", "qwen2-teal"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparse_logits_equal_masked_reference(case, sparsity, calibrated):
    directory = calibrated[case]
    model = load(directory, sparsity=sparsity, gate_prefill=True)
    reference = reference_model(directory, sparsity)
    ids = _ids(directory, 64, start=1000)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        dense = load(directory, sparsity=0, gate_prefill=True)(ids).logits
    assert _rel(want, got) <= 1e-4
    assert _rel(dense, got) > 1e-3, "the gates must actually change the output"
    stats = model.wina.stats()
    assert stats["sparsity"] > 0


def test_sparse_greedy_text_equals_reference(calibrated):
    directory = calibrated["llama"]
    model, reference = load(directory, sparsity=0.5, gate_prefill=True), reference_model(directory, 0.5)
    ids = _ids(directory, 8, start=1000)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), reference.generate(ids, **kw))


# --------------------------------------------------------------------------- prefill, batching, control

def test_gate_prefill_flag(calibrated):
    directory = calibrated["llama"]
    ids = _ids(directory, 32, start=1000)
    with torch.no_grad():
        dense = load(directory, sparsity=0, gate_prefill=True)(ids).logits
        ungated = load(directory, sparsity=0.5, gate_prefill=False)
        assert torch.equal(ungated(ids).logits, dense), "prompt tokens are not gated when gate_prefill=False"
        ungated.wina.reset_stats()
        ungated.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert ungated.wina.stats()["sparsity"] > 0.2, "decode tokens are always gated"
        gated = load(directory, sparsity=0.5, gate_prefill=True)
        assert not torch.equal(gated(ids).logits, dense)


def test_batched_generation_with_padding_equals_one_by_one(tiny_models, calibrated):
    from transformers import AutoTokenizer

    directory = calibrated["llama"]
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"
    prompts = ["The river", "A longer prompt about the weather in the mountains, which"]
    model = load(directory, sparsity=0, gate_prefill=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True)
        together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            single = tok(prompt, return_tensors="pt")
            alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1]:]
            assert torch.equal(together[row], alone), prompt


def test_set_sparsity_and_stats(calibrated):
    model = load(calibrated["llama"], gate_prefill=True)
    assert model.wina.sparsity == pytest.approx(0.5), "sparsity=None is the calibrated target"
    for bad in (-0.1, 0.95, "x"):
        with pytest.raises(WinaError):
            model.wina.set_sparsity(bad)
    model.wina.set_sparsity(0)
    model.wina.reset_stats()
    with torch.no_grad():
        model(_ids(calibrated["llama"], 16, start=1000))
    assert model.wina.stats()["sparsity"] == 0.0


def test_uncalibrated_checkpoint_runs_dense_only(tiny_models, tmp_path):
    out = convert(tiny_models["llama"], tmp_path / "o", calibrate=False, transform=True, quiet=True).output
    load(out, sparsity=0, gate_prefill=True)
    with pytest.raises(WinaError, match="not calibrated"):
        load(out, sparsity=0.5, gate_prefill=True)


def test_model_is_a_transformers_model(calibrated):
    from transformers import PreTrainedModel

    model = load(calibrated["llama"], gate_prefill=True)
    assert isinstance(model, PreTrainedModel)
    assert not any(type(m).__name__ == "Linear" and "layers" in n and "shortcut" not in n for n, m in model.named_modules())


# --------------------------------------------------------------------------- refusals

def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _edit_sidecar(directory: Path, edit) -> None:
    tensors, meta = sidecar_tensors(directory)
    edit(tensors, meta)
    save_file(tensors, str(directory / "wina.safetensors"), metadata={"wina": json.dumps(meta)})


def test_load_refuses_a_directory_without_sidecar(calibrated, tmp_path):
    d = _copy(calibrated["llama"], tmp_path)
    (d / "wina.safetensors").unlink()
    with pytest.raises(WinaError, match="wina.safetensors"):
        load(d, gate_prefill=True)


def test_load_refuses_a_plain_model(tiny_models):
    with pytest.raises(WinaError, match="not a WINA checkpoint"):
        load(tiny_models["llama"], gate_prefill=True)


def test_load_refuses_unknown_sidecar_version(calibrated, tmp_path):
    d = _copy(calibrated["llama"], tmp_path)
    _edit_sidecar(d, lambda t, m: m.update(format_version=99))
    write_manifest(d)
    with pytest.raises(WinaError, match="version 99"):
        load(d, gate_prefill=True)


def test_load_refuses_a_hand_edited_sidecar(calibrated, tmp_path):
    d = _copy(calibrated["llama"], tmp_path)
    _edit_sidecar(d, lambda t, m: t["model.layers.0.mlp.down_proj.quantiles"].mul_(-1))
    with pytest.raises(WinaError, match="changed since conversion"):
        load(d, gate_prefill=True)
    write_manifest(d)  # even with the manifest redone, the values are checked
    with pytest.raises(WinaError, match="quantile table"):
        load(d, gate_prefill=True)


def test_load_refuses_a_sidecar_of_other_weights(calibrated, tiny_models, tiny_tokenizer_dir, tmp_path):
    other = convert(build_tiny("llama", tmp_path / "other", tiny_tokenizer_dir, seed=1), tmp_path / "other-out",
                    sparsity=0.5, transform=True, samples=2, seq_len=64, quiet=True).output
    d = _copy(calibrated["llama"], tmp_path)
    shutil.copy(other / "wina.safetensors", d / "wina.safetensors")
    write_manifest(d)
    with pytest.raises(WinaError, match="does not match the weights"):
        load(d, gate_prefill=True)


def test_load_refuses_wrong_layer_count(calibrated, tmp_path):
    d = _copy(calibrated["llama"], tmp_path)
    _edit_sidecar(d, lambda t, m: m.update(num_layers=4))
    write_manifest(d)
    with pytest.raises(WinaError, match="4 layers"):
        load(d, gate_prefill=True)


def test_load_refuses_a_missing_shard(calibrated, tmp_path):
    d = _copy(calibrated["llama"], tmp_path)
    next(d.glob("model-*.safetensors")).unlink()
    with pytest.raises(WinaError, match="incomplete"):
        load(d, gate_prefill=True)


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_sparse_equals_reference_and_hits_target(smollm2_converted):
    ids = _ids(smollm2_converted, 128, start=1000)
    model = load(smollm2_converted, gate_prefill=True)
    reference = reference_model(smollm2_converted, 0.5)
    with torch.no_grad():
        assert _rel(reference(ids).logits, model(ids).logits) <= 1e-4
    result = evaluate(model, max_tokens=4096)
    # --sparsity counts decode bytes: the transformed matrices skip more columns to pay for the shortcuts
    skipped_bytes = 1 - result["kept_bytes_fraction"]
    assert abs(skipped_bytes - 0.5) <= 0.02, result
    assert result["head_in_budget"]  # the default: the output head skips part of the target's bytes
    # the budget's bytes: the layers' skipped columns and the head's, less the shortcuts read (counted here)
    ctl = model.wina
    gated = sum(g.weight.numel() for n, g in ctl.gates.items() if n != ctl.head)
    head = model.lm_head.weight.numel()
    shortcuts = 2 * model.config.hidden_size**2 * model.config.num_hidden_layers
    skipped = result["sparsity"] * gated + result["head_sparsity"] * head - shortcuts
    assert skipped / gated == pytest.approx(skipped_bytes, abs=1e-3)
    assert result["perplexity"] > result["dense_perplexity"]


@pytest.mark.slow
def test_smollm2_batched_generation_equals_one_by_one(smollm2_converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_converted)
    tok.padding_side = "left"
    prompts = ["Hello", "Write a short poem about the sea and the", "The capital of France is"]
    model = load(smollm2_converted, sparsity=0, gate_prefill=True)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
    with torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True)
        together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            single = tok(prompt, return_tensors="pt")
            alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1]:]
            # A row that ends early (EOS) is padded in the batch; one-by-one generation simply stops.
            assert torch.equal(together[row, : len(alone)], alone), prompt
            assert (together[row, len(alone):] == kw["pad_token_id"]).all(), prompt
