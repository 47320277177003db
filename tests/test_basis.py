"""``--basis`` (transform.py, convert.py): the transform's bases taken from calibration activations.

``pca`` rotates each sub-block's input into the principal axes of its calibration inputs, ``pooled``
the whole residual stream into one basis (no shortcut rotation stored, read or counted). Both must be
exact at sparsity 0, like ``svd``, on tiny random models (qwen2: q/k/v biases; both tied).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import heldout_ids as _ids, sparsity0_error
from wina_convert import convert, load
from wina_convert.errors import WinaError
from wina_convert.evaluate.inspect import describe
from wina_convert.evaluate.perplexity import evaluate
from wina_convert.runtime.modules import WinaDecoderLayer

TOLERANCE = 1e-5  # relative logit error at sparsity 0, float32 (the svd transform measures ~5e-7)
# a dense output head: the bases and their thresholds are the layers' (the in-budget head is test_head.py's)
CAL = dict(samples=4, seq_len=64, seed=0, quiet=True, head_sparsity=0.0)




def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def bases(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {f"{family}-{basis}": convert(tiny_models[family], root / f"{family}-{basis}", sparsity=0.5, transform=True,
                                         basis=basis, allocation="greedy", **CAL).output
            for family in ("llama", "qwen2") for basis in ("pca", "pooled")}


@pytest.mark.parametrize("case", ["llama-pca", "qwen2-pca", "llama-pooled", "qwen2-pooled"])
def test_basis_is_exact_at_sparsity_0(case, bases, tiny_models):
    family = case.split("-")[0]
    error = sparsity0_error(tiny_models[family], bases[case])
    assert error <= TOLERANCE, f"{case}: relative logit error {error:.2e}"


def test_pca_basis_is_the_principal_axes_of_the_calibration_inputs(bases, tiny_models):
    """Layer 0's attention basis ``Q`` (recovered from the rotated embedding ``E Q``) diagonalizes the second
    moment of its calibration inputs (the RMS-normalized embeddings of the calibration tokens), eigenvalues
    in decreasing order; the svd basis does not."""
    from wina_convert.calibration.calibrator import load_calibration_tokens
    from wina_convert.checkpoint.source import open_source

    source = open_source(tiny_models["llama"])
    tokens, _ = load_calibration_tokens(source, None, samples=CAL["samples"], seq_len=CAL["seq_len"], seed=CAL["seed"],
                                        device=torch.device("cpu"))
    embed = source.tensor("model.embed_tokens.weight").double()
    eps = source.config.rms_norm_eps
    x = embed[tokens.reshape(-1)]
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    moments = x.T @ x

    def off_diagonal(directory: Path) -> tuple[float, torch.Tensor]:
        rotated = _weights(directory)["model.embed_tokens.weight"].double()
        q = torch.linalg.lstsq(embed, rotated).solution
        assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-4)
        m = q.T @ moments @ q
        return float((m - torch.diag(torch.diag(m))).norm() / m.norm()), torch.diag(m)

    off, diagonal = off_diagonal(bases["llama-pca"])
    assert off < 1e-4
    assert (diagonal[:-1] >= diagonal[1:] * (1 - 1e-4)).all(), "by decreasing eigenvalue"
    svd = convert(tiny_models["llama"], bases["llama-pca"].parent / "llama-svd", sparsity=0.5, transform=True,
                  allocation="greedy", **CAL).output
    assert off_diagonal(svd)[0] > 0.05


def test_pooled_stores_and_charges_no_shortcut(bases):
    """One basis: no shortcut tensor in the checkpoint, none installed, no extra bytes; the matrices skip
    the target itself and the bytes read are 1 - target of the dense ones."""
    directory = bases["llama-pooled"]
    assert not [name for name in _weights(directory) if "shortcut" in name]
    meta = json.loads((directory / "config.json").read_text())["wina"]
    assert (meta["transform"], meta["basis"]) == (True, "pooled")
    model = load(directory, sparsity=0.5, gate_prefill=True)
    assert not any(isinstance(layer, WinaDecoderLayer) for layer in model.model.layers)
    assert list(model.wina.budget.extra) == [0.0] * model.config.num_hidden_layers
    info = describe(directory)
    assert info["basis"] == "pooled" and info["kept_bytes_fraction"] == pytest.approx(0.5, abs=1e-3)
    assert "pooled basis" in (directory / "README.md").read_text()  # the model card says so
    result = evaluate(model, sparsity=0.5, max_tokens=1024, seq_len=128)
    assert result["kept_bytes_fraction"] == pytest.approx(0.5, abs=0.06)
    # pca keeps the shortcuts and pays for them
    pca = load(bases["llama-pca"], sparsity=0.5, gate_prefill=True)
    assert all(isinstance(layer, WinaDecoderLayer) for layer in pca.model.layers)
    d = pca.config.hidden_size
    gated = sum(pca.wina.gates[n].weight.numel() for n in pca.wina.layers[0])
    assert pca.wina.budget.extra[0] == pytest.approx(2 * d * d / gated)
    assert describe(bases["llama-pca"])["basis"] == "pca"


@pytest.mark.parametrize("case", ["qwen2-pca", "llama-pooled"])
def test_thresholds_are_calibrated_in_the_final_bases(case, bases, tiny_models):
    """On the calibration tokens themselves every gate skips what it was calibrated to skip: the
    calibrator saw the activations of the checkpoint's own bases (pca's MLP output basis is only
    known a layer later; the calibrator's hidden states are moved into each new basis)."""
    from wina_convert.calibration.calibrator import load_calibration_tokens
    from wina_convert.checkpoint.source import open_source

    family = case.split("-")[0]
    tokens, _ = load_calibration_tokens(open_source(tiny_models[family]), None, samples=CAL["samples"],
                                        seq_len=CAL["seq_len"], seed=CAL["seed"], device=torch.device("cpu"))
    model = load(bases[case], sparsity=0.5, gate_prefill=True)
    control = model.wina
    control.set_counting(True)
    control.reset_stats()
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    achieved = control.stats()["per_gate"]
    for name, planned in control.gate_sparsities(0.5).items():
        splits = torch.tensor(control.gates[name].splits, dtype=torch.float64)
        assert achieved[name] == pytest.approx(float((planned.double() * splits).sum() / splits.sum()), abs=0.005), name


def test_pooled_round_trip(bases, tiny_models, tmp_path):
    """save_pretrained of a loaded pooled model writes a checkpoint that loads to the same logits, still
    without shortcut tensors."""
    model = load(bases["qwen2-pooled"], sparsity=0.5, gate_prefill=True)
    ids = _ids(tiny_models["qwen2"], 48)
    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved", sparsity=0.5, gate_prefill=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert not [name for name in _weights(tmp_path / "saved") if "shortcut" in name]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["wina"]["basis"] == "pooled"


def test_bad_basis_options_are_refused(tiny_models, tmp_path):
    cases = [(dict(basis="qr", transform=True), "unknown basis"),
             (dict(basis="pca", transform=False), "add --transform"),
             (dict(basis="pooled", transform=True, calibrate=False), "--no-calibrate")]
    for i, (kw, message) in enumerate(cases):
        with pytest.raises(WinaError, match=message) as info:
            convert(tiny_models["llama"], tmp_path / str(i), **{**CAL, **kw})
        assert "\n" not in str(info.value)
        assert not (tmp_path / str(i)).exists()


def test_cli_basis_error_is_one_line(tiny_models, tmp_path, capsys):
    from wina_convert.cli import main

    capsys.readouterr()
    code = main(["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "x"), "--basis", "pca"])
    err = capsys.readouterr().err
    assert code != 0
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines() if "add --transform" in line]
