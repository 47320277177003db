"""Reading the model to convert (issue 18, items 3 and 6): quantized inputs are refused, not cast without
their scales; a malformed index, ``--revision`` on a local path and ``--trust-remote-code`` are errors.

Every refusal is one line on stderr, exit 1 (2 for an unknown option), and nothing is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import assert_one_line_error, nothing_written, run
from wina_convert import convert
from wina_convert.errors import WinaError


@pytest.fixture()
def model(tiny_models, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], target)
    return target


def _set_quantization_config(model: Path, quant: dict) -> None:
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = quant
    (model / "config.json").write_text(json.dumps(config))


def _store_as(model: Path, name: str, dtype: torch.dtype, shape_div: int = 1) -> None:
    """Replace tensor ``name`` by a tensor of ``dtype`` (an int pack is ``shape_div`` times narrower)."""
    tensors = load_file(str(model / "model.safetensors"))
    w = tensors[name]
    if dtype.is_floating_point:
        tensors[name] = w.to(dtype)
    else:
        tensors[name] = torch.randint(0, 100, (w.shape[0], w.shape[1] // shape_div), dtype=dtype)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"
SCHEMES = {
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, torch.float8_e4m3fn, 1),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "float-quantized"}, torch.float8_e4m3fn, 1),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, torch.int32, 8),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm"}, torch.int32, 8),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, torch.uint8, 2),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_config_refused(model, tmp_path, capsys, scheme):
    quant, dtype, div = SCHEMES[scheme]
    _set_quantization_config(model, quant)
    _store_as(model, Q, dtype, div)
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out", "--no-calibrate", "-q")
    assert code == 1
    assert_one_line_error(code, err, "quantized", scheme, "dequantize")
    assert nothing_written(tmp_path)


def test_bitsandbytes_without_quant_method_is_named(model, tmp_path):
    _set_quantization_config(model, {"load_in_8bit": True})
    with pytest.raises(WinaError, match="bitsandbytes.*dequantize"):
        convert(model, tmp_path / "out", calibrate=False, quiet=True)


@pytest.mark.parametrize("dtype, name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"),
                                         (torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32")])
def test_non_float_weights_refused(model, tmp_path, capsys, dtype, name):
    """No quantization_config at all, but a weight stored as 8-bit floats or an integer pack."""
    _store_as(model, Q, dtype, 1 if dtype.is_floating_point else 4)
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out", "--no-calibrate", "-q")
    assert code == 1
    assert_one_line_error(code, err, name, Q, "dequantize")
    assert nothing_written(tmp_path)


def test_float_weights_of_every_width_still_convert(model, tmp_path):
    _store_as(model, Q, torch.bfloat16)
    convert(model, tmp_path / "out", calibrate=False, quiet=True)
    assert (tmp_path / "out" / "wina-manifest.json").is_file()


# --------------------------------------------------------------------------- item 6: options, index

def test_revision_on_a_local_directory_is_an_error(model, tmp_path, capsys):
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out", "--revision", "main", "--no-calibrate", "-q")
    assert code == 1
    assert_one_line_error(code, err, "--revision", "local")
    assert nothing_written(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(WinaError, match="--revision applies to Hub ids only"):
        convert(gguf, tmp_path / "out", revision="v1", quiet=True)


def test_local_directory_records_its_sha256(model, tmp_path):
    convert(model, tmp_path / "out", calibrate=False, quiet=True)
    base = json.loads((tmp_path / "out" / "config.json").read_text())["wina"]["base_model"]
    assert base["revision"] is None and len(base["sha256"]) == 64


def test_trust_remote_code_is_gone(model, tmp_path, capsys):
    """It did nothing (remote code never runs); an option that does nothing is removed, not kept."""
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out", "--trust-remote-code", "--no-calibrate", "-q")
    assert code == 2
    assert_one_line_error(code, err, "--trust-remote-code")
    with pytest.raises(TypeError):
        convert(model, tmp_path / "out", trust_remote_code=True)
    assert nothing_written(tmp_path)


def _shard(model: Path) -> Path:
    """The model as one shard plus an index, as sharded Hub checkpoints are."""
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    return model / "model.safetensors.index.json"


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe\x00binary",
    b'{"metadata": {}}',
    b'{"weight_map": ["model-00001-of-00001.safetensors"]}',
    b'{"weight_map": {}}',
    b'{"weight_map": {"model.embed_tokens.weight": 7}}',
    b'{"weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}',
    b'[1, 2, 3]',
])
def test_malformed_index_is_one_line(model, tmp_path, capsys, content):
    _shard(model).write_bytes(content)
    code, _, err = run(capsys, "convert", model, "-o", tmp_path / "out", "--no-calibrate", "-q")
    assert code == 1
    assert_one_line_error(code, err, "model.safetensors.index.json", "not a valid safetensors index")
    assert "Error:" not in err.split("index")[0]  # ours, not the catch-all "KeyError: ..." line
    assert nothing_written(tmp_path)


def test_valid_index_converts(model, tmp_path):
    names = load_file(str(model / "model.safetensors")).keys()
    index = _shard(model)
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    out = convert(model, tmp_path / "out", calibrate=False, transform=False, quiet=True).output
    source = load_file(str(model / "model-00001-of-00001.safetensors"))
    written = {}
    for shard in out.glob("model-*.safetensors"):
        written.update(load_file(str(shard)))
    # the index was followed to the renamed shard: every tensor it maps is read and written unchanged
    assert set(written) == set(source)
    assert all(torch.equal(written[n], source[n]) for n in source)
