"""``--overwrite`` (issue 18, item 1): it replaces only an empty directory or an earlier WINA checkpoint.

Never the input (a directory, a .gguf file, a Hub snapshot), never a directory that contains the input,
never a directory holding files the earlier checkpoint's manifest does not list. Each refusal is one line
naming the directory and why, exit 1, and nothing on disk changes (compared file by file).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, run, tree_hash
from wina_convert import convert
from wina_convert.errors import WinaError


@pytest.fixture()
def model(tiny_models, tmp_path) -> Path:
    target = tmp_path / "models" / "llama"
    shutil.copytree(tiny_models["llama"], target)
    return target


@pytest.fixture()
def checkpoint(model, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    convert(model, out, calibrate=False, quiet=True)
    return out


def _refused_cli(capsys, model, out: Path, *needles: str) -> None:
    watched = out if out.is_dir() else out.parent
    before = tree_hash(watched)
    code, _, err = run(capsys, "convert", model, "-o", out, "--no-calibrate", "-q", "--overwrite")
    assert code == 1
    assert_one_line_error(code, err, str(out), *needles)
    assert tree_hash(watched) == before, "nothing may be touched"
    assert not list(out.parent.glob(f".{out.name}.wina-*"))


def _refused_lib(model, out: Path, *needles: str) -> None:
    watched = out if out.is_dir() else out.parent
    before = tree_hash(watched)
    with pytest.raises(WinaError) as e:
        convert(model, out, calibrate=False, quiet=True, overwrite=True)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)
    assert tree_hash(watched) == before


@pytest.mark.parametrize("via", ["cli", "lib"])
def test_refuses_the_input_itself(model, capsys, via):
    (_refused_cli if via == "cli" else lambda m, o, *n: _refused_lib(m, o, *n))(
        *((capsys,) if via == "cli" else ()), model, model, "is the input")


@pytest.mark.parametrize("via", ["cli", "lib"])
def test_refuses_a_parent_of_the_input(model, capsys, via):
    parent = model.parent  # -o ~/models when the model is ~/models/llama
    if via == "cli":
        _refused_cli(capsys, model, parent, "contains the input")
        _refused_cli(capsys, model, parent.parent, "contains the input")
    else:
        _refused_lib(model, parent, "contains the input")


def test_refuses_the_input_by_another_spelling(model, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model.parent, target_is_directory=True)
    _refused_cli(capsys, link / "llama", link, "contains the input")
    _refused_cli(capsys, model, link, "contains the input")


def test_refuses_the_directory_of_a_gguf_input(tmp_path, capsys):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    gguf = folder / "model.gguf"
    gguf.write_bytes(b"GGUF not really")  # refused before it is read
    _refused_cli(capsys, gguf, folder, "contains the input")
    _refused_lib(gguf, folder, "contains the input")


def test_refuses_a_hub_snapshot(tiny_models, tmp_path, monkeypatch, capsys):
    """A Hub id resolves to a cache snapshot only once opened: -o onto the cache or the snapshot is refused
    (by the checkpoint rule first; ``OutputDir.protect`` checks the snapshot's paths again once known)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    shutil.copytree(tiny_models["llama"], snapshot)
    from wina_convert.hub import download

    monkeypatch.setattr(download, "resolve_model", lambda *a, **k: snapshot)
    monkeypatch.setattr(download, "hub_revision", lambda local: "abc")
    _refused_cli(capsys, "org/tiny", cache / "models--org--tiny", "not a WINA checkpoint")
    _refused_lib("org/tiny", snapshot, "not a WINA checkpoint")
    from wina_convert.checkpoint.writer import OutputDir

    with pytest.raises(WinaError, match="contains the input"):
        OutputDir(cache / "new", overwrite=True).protect([cache / "new" / "snapshots" / "x" / "model.safetensors"])


@pytest.mark.parametrize("via", ["cli", "lib"])
def test_refuses_a_directory_that_is_not_a_checkpoint(model, tmp_path, capsys, via):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    if via == "cli":
        _refused_cli(capsys, model, out, "not a WINA checkpoint")
    else:
        _refused_lib(model, out, "not a WINA checkpoint")
    assert (out / "precious.txt").read_text() == "mine"


def test_refuses_a_manifest_without_a_wina_config(model, checkpoint, capsys):
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"wina"', '"other"'))
    _refused_cli(capsys, model, checkpoint, "not a WINA checkpoint")


@pytest.mark.parametrize("where", ["notes.txt", "sub/dir/data.bin"])
def test_refuses_a_checkpoint_with_extra_files(model, checkpoint, capsys, where):
    extra = checkpoint / where
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text("mine")
    _refused_cli(capsys, model, checkpoint, "does not list", where)
    assert extra.read_text() == "mine"


def test_without_overwrite_the_input_is_named(model, capsys):
    before = tree_hash(model)
    code, _, err = run(capsys, "convert", model, "-o", model, "--no-calibrate", "-q")
    assert_one_line_error(code, err, "is the input")
    assert tree_hash(model) == before


def test_replaces_an_earlier_checkpoint_and_an_empty_directory(model, checkpoint, tmp_path, capsys):
    old = (checkpoint / "wina-manifest.json").read_text()
    (checkpoint / "README.md").write_text("edited card")  # the card is not in the manifest, and is ours
    code, _, err = run(capsys, "convert", model, "-o", checkpoint, "--sparsity", "0.3", "--samples", "2",
                       "--seq-len", "32", "-q", "--overwrite")
    assert code == 0, err
    assert (checkpoint / "wina-manifest.json").read_text() != old
    assert not list(checkpoint.parent.glob(".ckpt.wina-*")), "no leftovers beside it"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "convert", model, "-o", empty, "--no-calibrate", "-q", "--overwrite")
    assert code == 0 and (empty / "wina-manifest.json").is_file(), err


def test_refuses_without_overwrite(model, checkpoint, capsys):
    code, _, err = run(capsys, "convert", model, "-o", checkpoint, "--no-calibrate", "-q")
    assert_one_line_error(code, err, "not empty", "--overwrite")
