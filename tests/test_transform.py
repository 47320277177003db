"""The transform is exact: a converted model at sparsity 0 reproduces the original's logits and text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FAMILIES, ROOT
from wina_convert import convert, load
from wina_convert.transform import input_basis

# Relative logit error at sparsity 0, float32. Measured (benchmarks/exactness.py, results/exactness.txt):
# 4.1e-7 to 5.0e-7 on the tiny models, 2.6e-6 on SmolLM2; the bounds leave ~4x for other CPUs and BLAS.
TOLERANCE = 2e-6
SMOLLM2_TOLERANCE = 1e-5


def _original(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def _greedy(model, ids: torch.Tensor, n: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]


def _text_ids(directory: Path, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    text = (ROOT / "wina_convert" / "calibration" / "data" / "heldout" / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor([tok(text)["input_ids"][:tokens]])


@pytest.fixture(scope="module")
def converted_tiny(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted-tiny")
    return {f: convert(tiny_models[f], root / f, calibrate=False, transform=True, quiet=True).output for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_transform_is_exact_on_tiny_models(family, tiny_models, converted_tiny):
    original = _original(tiny_models[family])
    model = load(converted_tiny[family], sparsity=0, gate_prefill=True)
    ids = _text_ids(tiny_models[family], 96)
    with torch.no_grad():
        error = _relative_error(original(ids).logits, model(ids).logits)
    assert error <= TOLERANCE, f"{family}: relative logit error {error:.2e}"
    prompt = ids[:, :8]
    assert torch.equal(_greedy(original, prompt), _greedy(model, prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_transform_really_rotates(family, tiny_models, converted_tiny):
    """Not a copy: the MLP input weights have orthogonal columns after the transform, not before."""
    def gram_offdiag(w: torch.Tensor) -> float:
        g = w.double().T @ w.double()
        return float((g - torch.diag(torch.diag(g))).norm() / g.norm())

    name = "model.layers.1.mlp." + ("gate_up_proj" if family == "phi3" else "gate_proj") + ".weight"
    before = _load_tensor(tiny_models[family], name)
    after = _load_tensor(converted_tiny[family], name)
    if family == "phi3":
        before, after = before[: before.shape[0] // 2], after[: after.shape[0] // 2]
    assert gram_offdiag(before) > 0.05
    assert gram_offdiag(after) < 1e-5


def _load_tensor(directory: Path, name: str) -> torch.Tensor:
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(file)
        if name in tensors:
            return tensors[name]
    raise KeyError(name)


def test_input_basis_orthogonalizes_columns():
    torch.manual_seed(0)
    for rows, cols in ((48, 32), (16, 32)):  # tall, and wide like a grouped-query k_proj
        w = torch.randn(rows, cols, dtype=torch.float64)
        q = input_basis(w)
        assert torch.allclose(q.T @ q, torch.eye(cols, dtype=torch.float64), atol=1e-10)
        g = (w @ q).T @ (w @ q)
        assert torch.allclose(g, torch.diag(torch.diag(g)), atol=1e-8)
        norms = (w @ q).norm(dim=0)
        assert (norms[:-1] >= norms[1:] - 1e-9).all(), "columns ordered by decreasing singular value"


def test_no_transform_keeps_weights_and_runs_in_plain_transformers(tiny_models, tmp_path):
    out = convert(tiny_models["qwen2"], tmp_path / "out", transform=False, calibrate=False, quiet=True).output
    original = load_file(next(tiny_models["qwen2"].glob("*.safetensors")))
    written = {}
    for file in out.glob("model-*.safetensors"):
        written.update(load_file(file))
    assert set(original) <= set(written)
    for name, tensor in original.items():
        assert torch.equal(tensor, written[name]), name
    plain = _original(out)  # no wina-convert involved
    ids = _text_ids(tiny_models["qwen2"], 32)
    with torch.no_grad():
        assert _relative_error(_original(tiny_models["qwen2"])(ids).logits, plain(ids).logits) == 0.0


def test_transformed_checkpoint_is_refused_by_plain_transformers(converted_tiny):
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(converted_tiny["llama"])
    assert "wina-convert" in str(info.value)


def test_config_records_the_conversion(tiny_models, converted_tiny):
    config = json.loads((converted_tiny["mistral"] / "config.json").read_text())
    wina = config["wina"]
    assert wina["format_version"] == 2
    assert wina["transform"] is True and wina["method"] == "wina"
    assert wina["base_model_type"] == "mistral"
    assert wina["base_model"]["sha256"], "a local model is identified by the hash of its weights"
    assert config["model_type"] == "wina-convert"


@pytest.mark.slow
def test_transform_is_exact_on_smollm2(smollm2_hf, tmp_path):
    out = convert(smollm2_hf, tmp_path / "out", calibrate=False, transform=True, quiet=True).output
    original = _original(smollm2_hf)
    model = load(out, sparsity=0, gate_prefill=True)
    ids = _text_ids(smollm2_hf, 256)
    with torch.no_grad():
        error = _relative_error(original(ids).logits, model(ids).logits)
    assert error <= SMOLLM2_TOLERANCE, f"relative logit error {error:.2e}"
    prompt = ids[:, :16]
    assert torch.equal(_greedy(original, prompt), _greedy(model, prompt))


@pytest.mark.slow
def test_gguf_input_converts_exactly(smollm2_gguf, smollm2_hf, tmp_path):
    """A .gguf converts like its dequantized safetensors copy (same weights, same logits)."""
    out = convert(smollm2_gguf, tmp_path / "out", calibrate=False, transform=True, quiet=True).output
    model = load(out, sparsity=0, gate_prefill=True)
    ids = _text_ids(smollm2_hf, 64)
    with torch.no_grad():
        error = _relative_error(_original(smollm2_hf)(ids).logits, model(ids).logits)
    assert error <= SMOLLM2_TOLERANCE
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
