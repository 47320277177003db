"""``wina bench`` on CPU: a tiny converted model, the reference path, the shape and consistency of the result."""

from __future__ import annotations

import json

import pytest
import torch

from wina_convert import WinaError, convert, load
from wina_convert.evaluate.bench import bench, format_bench

SPARSITIES = (0.0, 0.5)


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_models, tmp_path_factory) -> dict[bool, object]:
    """The tiny Llama converted at 0.5 with and without the transform."""
    root = tmp_path_factory.mktemp("bench")
    out = {}
    for transform in (True, False):
        target = root / f"llama-{'t' if transform else 'n'}"
        convert(tiny_models["llama"], target, sparsity=0.5, transform=transform, quiet=True, samples=4, seq_len=64)
        out[transform] = target
    return out


@pytest.fixture(scope="module")
def result(tiny_checkpoints) -> dict:
    return bench(tiny_checkpoints[True], sparsities=SPARSITIES, tokens=6, prompt_tokens=5, device="cpu")


def test_result_is_well_formed(result):
    assert result["device"] == "cpu" and result["gpu"] is None and result["copy_gbps"] is None
    assert result["transform"] is True and result["graphs"] is False and result["kernels"] is False
    assert result["tokens"] == 6 and result["prompt_tokens"] == 5
    assert [r["sparsity"] for r in result["rows"]] == list(SPARSITIES)
    keys = {"label", "sparsity", "achieved_sparsity", "path", "tokens_per_s", "latency_ms", "latency_ms_p90",
            "bytes_per_token", "gbps", "speedup", "limit", "fraction_of_limit", "same_tokens_as_dense"}
    for row in [result["dense"], *result["rows"]]:
        assert keys <= set(row)
        assert row["tokens_per_s"] > 0 and row["latency_ms"] > 0 and row["latency_ms_p90"] >= row["latency_ms"]
    dense = result["dense"]
    assert dense["path"] == "dense" and dense["sparsity"] is None and dense["achieved_sparsity"] == 0.0
    assert dense["speedup"] == 1.0 and dense["limit"] == 1.0 and dense["efficiency"] is None
    assert all(r["path"] == "reference" for r in result["rows"])


def test_bytes_are_the_checkpoints_tensors(result, tiny_checkpoints):
    """The dense bytes a decode step reads, counted here from the checkpoint's safetensors files (not from the
    loaded modules bench walks): every stored weight but the embedding, one embedding row, and the static KV
    cache of the prompt and the decoded tokens."""
    from safetensors import safe_open

    stored = {}
    for shard in sorted(tiny_checkpoints[True].glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                stored[name] = t.numel() * t.element_size()
    gated = sum(n for name, n in stored.items()
                if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    embed = stored["model.embed_tokens.weight"]
    b = result["bytes"]
    assert b["gated"] == gated
    assert b["shortcuts"] == sum(n for name, n in stored.items() if "shortcut" in name) > 0
    assert b["lm_head"] == stored["lm_head.weight"]  # the transform unties the head
    config = json.loads((tiny_checkpoints[True] / "config.json").read_text())
    row = embed // config["vocab_size"]
    assert b["dense_per_token"] - b["kv_cache"] == sum(stored.values()) - embed + row
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_position = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # K and V, float32
    assert b["kv_cache"] % per_position == 0 and b["kv_cache"] // per_position >= 5 + 6  # prompt + decoded tokens


def test_sparsity_is_achieved_and_bytes_follow(result):
    at0, at5 = result["rows"]
    assert at0["achieved_sparsity"] == pytest.approx(0.0, abs=1e-6)  # zero thresholds drop only exact zeros
    assert at0["same_tokens_as_dense"]  # the sparse path at 0 computes the dense function
    assert at0["limit"] == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < at5["achieved_sparsity"] < 0.7  # calibrated for 0.5 on other text: near, not exact
    gated, head = result["bytes"]["gated"], result["bytes"]["lm_head"]
    skipped = result["dense"]["bytes_per_token"] - at5["bytes_per_token"]
    assert at0["head_sparsity"] in (None, 0.0) and result["dense"]["head_sparsity"] is None
    head_skipped = (at5["head_sparsity"] or 0.0) * head  # the default gates the head inside the budget
    assert skipped == pytest.approx(at5["achieved_sparsity"] * gated + head_skipped, abs=1)  # rounded to whole bytes
    assert 0.3 < skipped / gated < 0.7  # the budget: 0.5 of the gated sub-blocks' bytes, the head's share among them
    assert at5["limit"] == pytest.approx(result["dense"]["bytes_per_token"] / at5["bytes_per_token"])


def test_format_bench(result):
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(format_bench(result))
    text = console.export_text()
    assert "dense" in text and "s=0.50" in text and "no graphs" in text and "transform" in text


def test_loaded_model_without_transform_and_restored_state(tiny_checkpoints):
    model = load(tiny_checkpoints[False], sparsity=0.25, gate_prefill=True)
    res = bench(model, sparsities=(0.5,), tokens=3, prompt_tokens=2)
    assert res["transform"] is False and res["bytes"]["shortcuts"] == 0 and len(res["rows"]) == 1
    assert model.wina.sparsity == 0.25  # the model is left as it was found
    assert res["rows"][0]["bytes_per_token"] < res["dense"]["bytes_per_token"]


def test_bad_arguments(tiny_checkpoints):
    with pytest.raises(WinaError, match="tokens"):
        bench(tiny_checkpoints[False], tokens=1, device="cpu")
    with pytest.raises(WinaError, match="WINA model"):
        bench(torch.nn.Linear(2, 2), tokens=3)


def _run_bench_decode(tmp_path, *args):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode.py"
    return subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--layers", "1", "--tokens", "3",
                           "--prompt", "4", "--modes", "graphs", "--samples", "2", "--seq-len", "32",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=600)


def test_bench_decode_script_float16_one_checkpoint(tmp_path):
    """The decode benchmark script end to end on CPU (tiny shapes): --dtype and --only reach the table."""
    proc = _run_bench_decode(tmp_path, "--dtype", "float16", "--only", "no transform", "--name", "t")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out" / "t.md").read_text()
    assert "float16" in table and "| no transform | graphs | s=0.50 |" in table
    assert "| transform |" not in table
    assert not (tmp_path / "work" / "wina-transform").exists()  # --only converts just the measured checkpoint
    from safetensors import safe_open

    shard = next((tmp_path / "work" / "wina-plain").glob("model*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_bench_decode_script_rejects_unknown_checkpoint(tmp_path):
    proc = _run_bench_decode(tmp_path, "--only", "notransform")
    assert proc.returncode == 2 and "--only must be one of" in proc.stderr


def test_batch_and_fastest_dense(tiny_checkpoints):
    """Two sequences decode together; every row is compared with the faster of dense and fused dense."""
    res = bench(tiny_checkpoints[False], sparsities=(0.0, 0.5), tokens=4, prompt_tokens=3, device="cpu", batch=2)
    assert res["batch"] == 2 and res["read_gbps"] is None
    rows = [res["dense"], *res["rows"]]
    assert res["fastest_dense"] in ("dense", "fused dense") and res["rows"][0]["label"] == "fused dense"
    fastest = max(r["tokens_per_s"] for r in rows[:2])
    for row in rows:
        assert row["speedup_vs_fastest_dense"] == pytest.approx(row["tokens_per_s"] / fastest)
        assert row["byte_limit_tokens_per_s"] is None and row["fraction_of_byte_limit"] is None
    assert res["rows"][1]["achieved_sparsity"] > 0.3  # no kernels bound on CPU: the batch is gated (reference)
    with pytest.raises(WinaError, match="batch"):
        bench(tiny_checkpoints[False], tokens=3, device="cpu", batch=0)
