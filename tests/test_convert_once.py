"""``wina convert`` is one pass: it never loads its own output, and writes each output file once."""

import sys
from collections import Counter
from pathlib import Path

import pytest

import wina_convert.runtime.load as runtime_load
from wina_convert import convert
import wina_convert.convert  # noqa: F401  (the module, whose write_sidecar is watched)
from wina_convert.checkpoint import format as checkpoint_format

_watch: dict = {"root": None, "writes": Counter(), "reads": Counter()}


def _audit(event: str, args: tuple) -> None:
    root = _watch["root"]
    if root is None or event != "open" or not isinstance(args[0], (str, Path)):
        return
    path = str(args[0])
    if root not in path:
        return
    mode = args[1] if isinstance(args[1], str) else ""
    flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
    writing = any(c in mode for c in "wax+") or bool(flags & 0o3)  # O_WRONLY | O_RDWR
    _watch["writes" if writing else "reads"][Path(path).name] += 1


sys.addaudithook(_audit)


@pytest.mark.parametrize("options", [dict(), dict(head_sparsity=0.3, allocation="greedy")], ids=["defaults", "fixed-head"])
def test_convert_writes_each_file_once_and_never_loads_its_output(tiny_models, tmp_path, monkeypatch, options):
    def refuse(*args, **kwargs):
        raise AssertionError("convert loaded its own output")

    monkeypatch.setattr(runtime_load, "load", refuse)
    sidecars = []
    real_write_sidecar = checkpoint_format.write_sidecar
    monkeypatch.setattr(sys.modules["wina_convert.convert"], "write_sidecar",
                        lambda *a, **k: (sidecars.append(a[0]), real_write_sidecar(*a, **k)))
    _watch.update(root=str(tmp_path), writes=Counter(), reads=Counter())
    try:
        result = convert(tiny_models["llama"], tmp_path / "out", sparsity=0.5, samples=4, seq_len=64, search_tokens=64,
                         quiet=True, **options)
    finally:
        _watch["root"] = None
    written = _watch["writes"]
    assert len(sidecars) == 1
    for name in ("config.json", "README.md", "wina-manifest.json", "model.safetensors.index.json", "tokenizer.json"):
        assert written[name] == 1, (name, written)
    assert all(count == 1 for count in written.values()), written
    # config.json is read back only to hash it into the manifest and to write the card from it
    assert _watch["reads"]["config.json"] <= 2, _watch["reads"]
    stages = result.stage_seconds
    assert "layer search" in stages or options
    assert "head" in stages and "calibrate" in stages
