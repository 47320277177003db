"""Gemma 3: exact at sparsity 0, calibrated through its post-sub-block norms, the CLI end to end, and
the refusals (``--transform``, the multimodal config). The real Gemma-3-270M is at the end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_one_line_error, nothing_written, run
from tests.reference import reference_model
from wina_convert import WinaError, convert, evaluate, load
from wina_convert.calibration.text import HELDOUT, read_texts, token_windows

SAMPLES, SEQ = 4, 64


def _original(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def _heldout_ids(directory: Path, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the held-out text as the model's tokenizer encodes it (BOS first)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    text = (HELDOUT / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor([tok(text)["input_ids"][:n]])


def _greedy(model, ids: torch.Tensor, n: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def gemma_calibrated(tiny_gemma3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma3-cal") / "out"
    # per-layer greedy: the propagation test below checks each gate at the level calibration propagated it at
    # (the layer search then moves layers to other levels, where thresholds are interpolated, not propagated)
    # and a dense output head: every gate here is a layer's, at the level calibration propagated
    return convert(tiny_gemma3, out, sparsity=0.5, transform=False, samples=SAMPLES, seq_len=SEQ, allocation="greedy",
                   head_sparsity=0.0, quiet=True).output


# --------------------------------------------------------------------------- exactness and calibration

def test_no_transform_is_exact_at_sparsity_0(tiny_gemma3, tmp_path):
    out = convert(tiny_gemma3, tmp_path / "out", calibrate=False, transform=False, quiet=True).output
    original, model = _original(tiny_gemma3), load(out, sparsity=0, gate_prefill=True)
    ids = _heldout_ids(tiny_gemma3, 96)  # longer than the sliding window (8)
    with torch.no_grad():
        assert _rel(original(ids).logits, model(ids).logits) <= 1e-6
    prompt = ids[:, :12]
    assert torch.equal(_greedy(original, prompt), _greedy(model, prompt))
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"


def test_calibration_propagates_through_the_post_norms(gemma_calibrated):
    """On its own calibration windows every gate of the loaded model zeroes the fraction calibrated for it.

    Each gate's quantiles are measured on the activations that calibration propagated; they are those
    the runtime produces only if calibration applied what the model applies: the post-attention and
    post-feedforward norms before each residual add, the embedding scale, each layer's rotary base and
    the sliding window (8 positions, windows of 64). Leaving out the post-sub-block norms in the
    propagation puts gates 0.018 off; leaving out the window, 0.05."""
    from transformers import AutoTokenizer

    model = load(gemma_calibrated, gate_prefill=True)
    texts, _ = read_texts(None)
    windows = token_windows(AutoTokenizer.from_pretrained(gemma_calibrated), texts, SAMPLES, SEQ, seed=0)
    model.wina.reset_stats()
    with torch.no_grad():
        model(windows)
    achieved = model.wina.stats()["per_gate"]
    wanted = model.wina.gate_sparsities(0.5)
    assert len(achieved) == 3 * 7
    for name, fraction in achieved.items():
        assert fraction == pytest.approx(float(wanted[name][0]), abs=0.005), name


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_sparse_logits_equal_masked_reference(gemma_calibrated, sparsity):
    model = load(gemma_calibrated, sparsity=sparsity, gate_prefill=True)
    reference = reference_model(gemma_calibrated, sparsity)  # plain transformers + hooks written in the test
    ids = _heldout_ids(gemma_calibrated, 48)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        dense = load(gemma_calibrated, sparsity=0, gate_prefill=True)(ids).logits
    assert _rel(want, got) <= 1e-4
    assert _rel(dense, got) > 1e-3, "the gates must actually change the output"


def test_wina_layer_applies_the_post_norms(tiny_gemma3):
    """The generic decoder layer (what a transformed checkpoint runs) asks the adapter for the post-sub-block
    norms: with identity shortcuts it computes exactly what Gemma3DecoderLayer computes."""
    from wina_convert.arch import adapter_for
    from wina_convert.runtime.load import wrap_layer

    model = _original(tiny_gemma3)
    config = model.config
    layer = model.model.layers[2]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, config.hidden_size, generator=g)
    positions = torch.arange(10).unsqueeze(0)
    cos, sin = model.model.rotary_emb(h, positions, config.layer_types[2])
    with torch.no_grad():
        want = layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
        want = want[0] if isinstance(want, tuple) else want
        wrapped = wrap_layer(layer, adapter_for("gemma3_text"), config.hidden_size)
        for shortcut in (wrapped.attn_shortcut, wrapped.mlp_shortcut):
            shortcut.weight.copy_(torch.eye(config.hidden_size))
        got = wrapped(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the CLI end to end

def test_cli_convert_eval_inspect_generate_bench_push(tiny_gemma3, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", tiny_gemma3, "-o", out, "--no-transform", "--samples", "4", "--seq-len", "64")
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", out, "--json", "--max-tokens", "512", "--seq-len", "128")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["protocol"] == "deployed" and result["tokens"] == 4 * 64 and 0.3 < result["sparsity"] < 0.7  # second halves scored
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 0
    code, stdout, err = run(capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(stdout)["layers"] == 3, err
    code, stdout, err = run(capsys, "generate", out, "Once upon a time", "-n", "5", "--raw")
    assert code == 0 and stdout.strip(), err
    code, stdout, err = run(capsys, "bench", out, "--sparsity", "0.5", "--tokens", "12", "--device", "cpu", "--json")
    assert code == 0, err
    bench = json.loads(stdout)
    assert bench["rows"][0]["achieved_sparsity"] > 0.2 and bench["dense"]["tokens_per_s"] > 0
    code, stdout, err = run(capsys, "push", out, "me/gemma3-tiny-wina", "--dry-run")
    assert code == 0, err
    assert "config.json" in stdout + err and "wina.safetensors" in stdout + err


# --------------------------------------------------------------------------- refusals

def test_transform_is_refused_in_one_line_and_nothing_is_written(tiny_gemma3, tmp_path, capsys):
    code, _, err = run(capsys, "convert", tiny_gemma3, "-o", tmp_path / "out", "--transform")
    assert code == 1
    assert_one_line_error(code, err, "--transform is not supported for Gemma 3", "post-attention", "--no-transform")
    assert nothing_written(tmp_path)
    with pytest.raises(WinaError, match="do not commute"):
        convert(tiny_gemma3, tmp_path / "out", transform=True, quiet=True)
    assert nothing_written(tmp_path)


def test_multimodal_gemma3_is_refused(tmp_path, capsys):
    model = tmp_path / "gemma3-mm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}))
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "multimodal", "gemma3_text")
    assert nothing_written(tmp_path)


def test_bidirectional_gemma3_is_refused(tiny_gemma3, tmp_path):
    import shutil

    model = tmp_path / "bidirectional"
    shutil.copytree(tiny_gemma3, model)
    config = json.loads((model / "config.json").read_text())
    config["use_bidirectional_attention"] = True
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(WinaError, match="bidirectional"):
        convert(model, tmp_path / "out", quiet=True)
    assert nothing_written(tmp_path)


# --------------------------------------------------------------------------- the real Gemma-3-270M

@pytest.fixture(scope="module")
def gemma3_converted(gemma3_hf, tmp_path_factory) -> Path:
    """Gemma-3-270M converted at 0.5 with the defaults (no transform, bundled calibration set) but 4 x 512
    calibration windows instead of 16 x 512, to keep the slow tests within a few minutes."""
    out = tmp_path_factory.mktemp("gemma3-real") / "out"
    # greedy: the layer search's 40 forwards with a 262k vocabulary take minutes on this CPU
    return convert(gemma3_hf, out, sparsity=0.5, transform=False, samples=4, allocation="greedy", quiet=True).output


@pytest.mark.slow
def test_gemma3_270m_is_exact_at_sparsity_0(gemma3_hf, gemma3_converted):
    original, model = _original(gemma3_hf), load(gemma3_converted, sparsity=0, gate_prefill=True)
    ids = _heldout_ids(gemma3_hf, 256)
    with torch.no_grad():
        error = _rel(original(ids).logits, model(ids).logits)
    assert error <= 1e-6, f"relative logit error {error:.2e}"
    prompt = ids[:, :16]
    assert torch.equal(_greedy(original, prompt), _greedy(model, prompt))


@pytest.mark.slow
def test_gemma3_270m_tokenizer_adds_bos_and_windows_keep_it(gemma3_hf):
    from transformers import AutoTokenizer

    from wina_convert.calibration.text import eval_windows, heldout_texts, leading_bos

    tok = AutoTokenizer.from_pretrained(gemma3_hf)
    assert leading_bos(tok) == tok.bos_token_id == 2
    windows = eval_windows(tok, heldout_texts(None)[0], 512, 2048)
    assert (windows[:, 0] == 2).all() and not (windows[:, 1:] == 2).any()


@pytest.mark.slow
def test_gemma3_270m_hits_the_target_on_heldout_text(gemma3_converted):
    model = load(gemma3_converted, gate_prefill=True)
    reference = reference_model(gemma3_converted, 0.5)
    ids = _heldout_ids(gemma3_converted, 128)
    with torch.no_grad():
        assert _rel(reference(ids).logits, model(ids).logits) <= 1e-4
    result = evaluate(model, max_tokens=4096)
    # the target is bytes: the layers' and the output head's (gated inside the budget by default) together
    assert result["head_in_budget"] and abs(1 - result["kept_bytes_fraction"] - 0.5) <= 0.02, result
    # 18.4 dense and 48.7 sparse (2.64x) with the default 16 x 512 calibration windows (docs/results.md)
    assert result["dense_perplexity"] < result["perplexity"] < 4 * result["dense_perplexity"], result


@pytest.mark.slow
def test_gemma3_270m_with_every_default(gemma3_hf, tmp_path):
    """The real Gemma-3-270M converted with every default (layer search, output head in the budget, 16 x 512
    calibration windows), as a user's first ``wina convert`` runs it: the fixture above uses per-layer greedy.
    On held-out text (never calibrated on) the model skips the target's bytes and stays near dense."""
    out = convert(gemma3_hf, tmp_path / "out", quiet=True).output
    wina = json.loads((out / "config.json").read_text())["wina"]
    assert wina["target_sparsity"] == 0.5 and wina["calibration"]["allocation"] == "output"
    result = evaluate(out, max_tokens=4096)
    assert result["head_in_budget"] and result["head_sparsity"] > 0, result  # the search gave the head a share
    assert abs(1 - result["kept_bytes_fraction"] - 0.5) <= 0.03, result
    assert math.isfinite(result["perplexity"]), result
    assert result["dense_perplexity"] < result["perplexity"] < 2 * result["dense_perplexity"], result
