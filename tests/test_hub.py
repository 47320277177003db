"""wina_convert.hub against the real huggingface_hub client and a fake Hub on 127.0.0.1 (no network)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fake_hub import FakeHub
from wina_convert.hub import card as hub_card
from wina_convert.hub import download as hub_download
from wina_convert.hub import push as hub_push
from wina_convert.errors import WinaError

TOKEN = "hf_FakeTokenForTests0123456789abcdef"
WRONG = "hf_WrongTokenNotAccepted9876543210zz"


# --------------------------------------------------------------------------- fixtures

def _write_manifest(directory: Path) -> None:
    from wina_convert.checkpoint.format import write_manifest

    write_manifest(directory)


WINA_BLOCK = {
    "format_version": 1,
    "tool_version": "0.1.0",
    "method": "wina",
    "transform": True,
    "target_sparsity": 0.5,
    "base_model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "a" * 40, "sha256": None},
    "base_model_type": "llama",
    "license": "apache-2.0",
    "sidecar": "wina.safetensors",
    "calibration": {
        "dataset": "bundled", "samples": 16, "seq_len": 256, "seed": 0, "allocation": "greedy",
        "target_sparsity": 0.5,
        "report": {"attention_input": 0.49, "attention_output": 0.51, "mlp_input": 0.5, "mlp_down": 0.52,
                   "overall": 0.5},
    },
    "eval": {"dense_perplexity": 12.34, "perplexity": 13.57, "sparsity": 0.5, "tokens": 4096},
}


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(name, shards=2, seed=0, **wina_overrides) -> a small, valid WINA checkpoint directory."""

    def make(name: str = "ckpt", *, shards: int = 2, seed: int = 0, card: bool = True, **wina) -> Path:
        directory = tmp_path / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("model-*-of-*.safetensors"):
            old.unlink()
        gen = torch.Generator().manual_seed(seed)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(16, 32, generator=gen),
                       f"model.layers.{i}.input_layernorm.weight": torch.ones(16)}
            save_file(tensors, str(directory / shard), metadata={"format": "pt"})
            weight_map.update({t: shard for t in tensors})
        total = sum((directory / s).stat().st_size for s in set(weight_map.values()))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        save_file({"layers.0.mlp_down.col_norm": torch.rand(32, generator=gen)}, str(directory / "wina.safetensors"),
                  metadata={"wina": json.dumps({"format_version": 1})})
        block = {**json.loads(json.dumps(WINA_BLOCK)), **wina}
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "wina-convert", "hidden_size": 16,
                  "num_hidden_layers": shards, "vocab_size": 32, "wina": block}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
        (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
        (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        if card:
            hub_card.write_model_card(directory)
        _write_manifest(directory)
        return directory

    return make


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """A huggingface_hub with no saved login, an empty cache, Xet off (the fake speaks LFS) and online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what HF_HUB_DISABLE_XET=1 sets at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _point_at(monkeypatch, url: str, *, constants_too: bool = True) -> None:
    """HF_ENDPOINT=url, as if exported before Python started (huggingface_hub reads it at import)."""
    from huggingface_hub import constants, file_download

    monkeypatch.setenv("HF_ENDPOINT", url)
    if constants_too:
        template = url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):  # huggingface_hub 0.x copies it at import
            monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def fake_hub(isolated):
    """The fake Hub, reached through HF_ENDPOINT, with HF_TOKEN set to the token it accepts."""
    with FakeHub(token=TOKEN) as server:
        _point_at(isolated, server.url)
        isolated.setenv("HF_TOKEN", TOKEN)
        yield server


HF_VERSION = tuple(int(x) for x in __import__("huggingface_hub").__version__.split(".")[:2])


@pytest.mark.skipif(HF_VERSION < (1, 0), reason="huggingface_hub 0.x builds CommitInfo URLs from the import-time endpoint")
def test_endpoint_chosen_after_import(isolated, make_checkpoint):
    """HF_ENDPOINT set after huggingface_hub was imported still wins: the hub modules pass endpoint= explicitly."""
    with FakeHub(token=TOKEN) as server:
        _point_at(isolated, server.url, constants_too=False)
        isolated.setenv("HF_TOKEN", TOKEN)
        ckpt = make_checkpoint()
        hub_push.push(ckpt, "alice/late", quiet=True)
        folder = hub_download.resolve_model("alice/late", purpose="load")
        assert (folder / "wina.safetensors").read_bytes() == (ckpt / "wina.safetensors").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_one_line(error: BaseException, *secrets: str) -> str:
    text = str(error)
    assert "\n" not in text and text.strip() == text and text
    for secret in (TOKEN, WRONG, *secrets):
        assert secret not in text
        assert secret not in repr(error)
    return text


# --------------------------------------------------------------------------- push

def test_push_uploads_exactly_the_checkpoint_files(fake_hub, make_checkpoint):
    ckpt = make_checkpoint()
    (ckpt / "notes.txt").write_text("scratch notes")
    (ckpt / "stray.safetensors").write_bytes(b"not part of the checkpoint")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "big.bin").write_bytes(b"\0" * 100)

    result = hub_push.push(ckpt, "alice/tiny-wina", quiet=True)

    assert result.url == f"{fake_hub.url}/alice/tiny-wina"
    assert not result.dry_run
    manifest = json.loads((ckpt / "wina-manifest.json").read_text())["files"]
    expected = set(manifest) | {"README.md", "wina-manifest.json"}
    assert set(result.files) == expected
    remote = fake_hub.files("alice/tiny-wina")
    assert set(remote) == expected | {".gitattributes"}
    for name in expected:
        assert remote[name] == (ckpt / name).read_bytes(), name
    # weights went through the LFS protocol (batch + PUT, sha256-checked by the server), the rest inline
    commit = fake_hub.commit_payloads[-1]
    lfs = {item["value"]["path"] for item in commit if item["key"] == "lfsFile"}
    inline = {item["value"]["path"] for item in commit if item["key"] == "file"}
    assert lfs == {n for n in expected if n.endswith(".safetensors")}
    assert "config.json" in inline and "README.md" in inline
    assert {hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in lfs} <= set(fake_hub.lfs)
    assert any(p.endswith("/info/lfs/objects/batch") for p in fake_hub.paths_requested("POST"))
    # the card now names the repo in its load snippet
    assert 'wina_convert.load("alice/tiny-wina")' in remote["README.md"].decode()
    assert fake_hub.repos["alice/tiny-wina"].messages[-1].startswith("Upload WINA checkpoint")
    assert fake_hub.create_payloads[-1].get("visibility") in (None, "public")
    assert fake_hub.create_payloads[-1].get("private") in (None, False)
    assert not fake_hub.repos["alice/tiny-wina"].private


def test_push_private_flag_reaches_create_repo(fake_hub, make_checkpoint):
    hub_push.push(make_checkpoint(), "alice/secret-wina", private=True, commit_message="my message", quiet=True)
    payload = fake_hub.create_payloads[-1]
    assert payload.get("visibility") == "private" or payload.get("private") is True
    assert payload["name"] == "secret-wina" and payload["organization"] == "alice"
    assert fake_hub.repos["alice/secret-wina"].private
    assert fake_hub.repos["alice/secret-wina"].messages[-1] == "my message"


def test_push_to_existing_repo_and_new_branch(fake_hub, make_checkpoint):
    fake_hub.add_repo("alice/existing", {"README.md": b"old"})
    main_before = fake_hub.repos["alice/existing"].branches["main"]
    ckpt = make_checkpoint()
    result = hub_push.push(ckpt, "alice/existing", revision="sparse-0.5", quiet=True)
    repo = fake_hub.repos["alice/existing"]
    assert result.url == f"{fake_hub.url}/alice/existing/tree/sparse-0.5"
    assert result.revision == "sparse-0.5"
    assert repo.branches["main"] == main_before  # main untouched
    assert fake_hub.files("alice/existing", "sparse-0.5")["wina.safetensors"] == (ckpt / "wina.safetensors").read_bytes()
    # pushing to the branch again: the branch exists (409 from the server is fine)
    hub_push.push(ckpt, "alice/existing", revision="sparse-0.5", quiet=True)


def test_push_create_pr(fake_hub, make_checkpoint):
    fake_hub.add_repo("alice/pr-target", {"README.md": b"old"})
    main_before = fake_hub.repos["alice/pr-target"].branches["main"]
    result = hub_push.push(make_checkpoint(), "alice/pr-target", create_pr=True, quiet=True)
    repo = fake_hub.repos["alice/pr-target"]
    assert result.url == f"{fake_hub.url}/alice/pr-target/discussions/1"
    assert repo.branches["main"] == main_before
    assert "wina-manifest.json" in fake_hub.files("alice/pr-target", "refs/pr/1")
    with pytest.raises(WinaError, match="create-pr"):
        hub_push.push(make_checkpoint(), "alice/pr-target", create_pr=True, revision="dev", quiet=True)


def test_push_again_removes_stale_shards(fake_hub, make_checkpoint):
    hub_push.push(make_checkpoint(shards=3), "alice/reshard", quiet=True)
    assert "model-00003-of-00003.safetensors" in fake_hub.files("alice/reshard")
    ckpt = make_checkpoint(shards=1, seed=1)
    hub_push.push(ckpt, "alice/reshard", quiet=True)
    remote = fake_hub.files("alice/reshard")
    assert sorted(n for n in remote if n.startswith("model-")) == ["model-00001-of-00001.safetensors"]
    assert remote["model-00001-of-00001.safetensors"] == (ckpt / "model-00001-of-00001.safetensors").read_bytes()


def test_push_keeps_a_user_written_card(fake_hub, make_checkpoint):
    ckpt = make_checkpoint(card=False)
    own = "---\nlicense: mit\n---\n# My own card\n"
    (ckpt / "README.md").write_text(own)
    hub_push.push(ckpt, "alice/own-card", quiet=True)
    assert (ckpt / "README.md").read_text() == own
    assert fake_hub.files("alice/own-card")["README.md"].decode() == own


def test_push_refuses_a_modified_checkpoint_before_any_request(fake_hub, make_checkpoint):
    ckpt = make_checkpoint()
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WinaError) as err:
        hub_push.push(ckpt, "alice/broken", quiet=True)
    assert "model-00001-of-00002.safetensors" in _assert_one_line(err.value)
    assert fake_hub.requests == []


def test_dry_run_makes_no_request(fake_hub, make_checkpoint, capsys):
    ckpt = make_checkpoint()
    (ckpt / "stray.txt").write_text("x")
    readme_before = (ckpt / "README.md").read_text()
    result = hub_push.push(ckpt, "alice/dry", dry_run=True, private=True)
    assert result.dry_run
    assert fake_hub.requests == []
    assert "alice/dry" not in fake_hub.repos
    assert "stray.txt" not in result.files
    assert set(result.files) == set(json.loads((ckpt / "wina-manifest.json").read_text())["files"]) | {
        "README.md", "wina-manifest.json"}
    err = capsys.readouterr().err
    assert f"{fake_hub.url}/alice/dry" in err and "model-00002-of-00002.safetensors" in err and "stray" not in err
    assert (ckpt / "README.md").read_text() == readme_before  # a dry run writes nothing


def test_dry_run_needs_no_server(isolated, make_checkpoint):
    _point_at(isolated, f"http://127.0.0.1:{_free_port()}")
    result = hub_push.push(make_checkpoint(), "alice/dry", dry_run=True, quiet=True)
    assert result.dry_run and "config.json" in result.files


# --------------------------------------------------------------------------- push errors

def test_push_wrong_token_401(fake_hub, make_checkpoint):
    fake_hub.add_repo("alice/x", {"README.md": b"x"})
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/x", token=WRONG, quiet=True)
    text = _assert_one_line(err.value)
    assert "rejected the token (401)" in text and "HF_TOKEN" in text


def test_push_wrong_token_from_env_401(fake_hub, make_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRONG)
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/y", quiet=True)
    assert "401" in _assert_one_line(err.value)


def test_push_forbidden_403(fake_hub, make_checkpoint):
    fake_hub.add_repo("bob/theirs", {"README.md": b"x"})
    fake_hub.read_only.add("bob/theirs")
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "bob/theirs", quiet=True)
    text = _assert_one_line(err.value)
    assert "no permission to write to bob/theirs" in text and "403" in text
    assert "wina-manifest.json" not in fake_hub.files("bob/theirs")


def test_push_not_found_404(fake_hub, make_checkpoint):
    fake_hub.fail.append(("/api/models/alice/gone/preupload", 404, "RepoNotFound", "Repository not found"))
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/gone", quiet=True)
    text = _assert_one_line(err.value)
    assert "no such model repo" in text and "alice/gone" in text and "404" in text


def test_push_other_http_error_names_status(fake_hub, make_checkpoint):
    fake_hub.fail.append(("/api/models/alice/odd/commit", 422, None, "Your push was rejected: too many files"))
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/odd", quiet=True)
    text = _assert_one_line(err.value)
    assert "422" in text and "too many files" in text


def test_push_token_echoed_by_server_is_scrubbed(fake_hub, make_checkpoint):
    fake_hub.fail.append(("/api/models/alice/echo/commit", 422, None, f"bad request from token {TOKEN}"))
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/echo", quiet=True)
    text = _assert_one_line(err.value)
    assert "422" in text and "***" in text
    assert err.value.__cause__ is None  # the original, unscrubbed exception is not chained


def test_push_hub_unreachable(isolated, make_checkpoint):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    _point_at(isolated, endpoint)
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/x", token=TOKEN, quiet=True)
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in _assert_one_line(err.value)


def test_push_rejects_bad_repo_id(fake_hub, make_checkpoint):
    with pytest.raises(WinaError, match="not a Hub repo id"):
        hub_push.push(make_checkpoint(), "alice/a/b", quiet=True)
    assert fake_hub.requests == []


# --------------------------------------------------------------------------- download

def test_load_round_trip_is_byte_identical(fake_hub, make_checkpoint):
    ckpt = make_checkpoint()
    hub_push.push(ckpt, "alice/round", quiet=True)
    fake_hub.add_repo("alice/round", {"extra/other.safetensors": b"y" * 10, "pytorch_model.bin": b"z"})
    fake_hub.requests.clear()

    folder = hub_download.resolve_model("alice/round", purpose="load")

    manifest = json.loads((ckpt / "wina-manifest.json").read_text())["files"]
    for name in list(manifest) + ["wina-manifest.json"]:
        assert (folder / name).read_bytes() == (ckpt / name).read_bytes(), name
    downloaded = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert downloaded == set(manifest) | {"wina-manifest.json"}
    gets = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in fake_hub.paths_requested("GET") if "/resolve/" in p}
    assert gets == downloaded
    from wina_convert.checkpoint.format import verify_checkpoint

    assert verify_checkpoint(folder)["target_sparsity"] == 0.5
    assert hub_download.hub_revision(folder) == fake_hub.repos["alice/round"].branches["main"]


def test_convert_download_fetches_only_what_convert_needs(fake_hub, tmp_path):
    shard1, shard2 = b"S1" * 1000, b"S2" * 1000
    files = {
        "config.json": b'{"model_type": "llama"}',
        "generation_config.json": b"{}",
        "tokenizer.json": b'{"model": {}}',
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "model.safetensors.index.json": json.dumps(
            {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}).encode(),
        "model-00001-of-00002.safetensors": shard1,
        "model-00002-of-00002.safetensors": shard2,
        "consolidated.safetensors": b"duplicate weights",
        "pytorch_model.bin": b"pickle",
        "onnx/model.safetensors": b"onnx",
        "README.md": b"# base",
        "original/params.json": b"{}",
    }
    sha = fake_hub.add_repo("org/base", files)
    folder = hub_download.resolve_model("org/base")
    wanted = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors"}
    downloaded = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert downloaded == wanted
    for name in wanted:
        assert (folder / name).read_bytes() == files[name]
    requested = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in fake_hub.paths_requested() if "/resolve/" in p}
    assert requested == wanted
    assert hub_download.hub_revision(folder) == sha

    # pinned revision: the same snapshot
    assert hub_download.resolve_model("org/base", revision=sha) == folder


def test_offline_uses_the_cache(fake_hub, monkeypatch):
    fake_hub.add_repo("org/base", {"config.json": b"{}", "model.safetensors": b"w" * 100})
    folder = hub_download.resolve_model("org/base")
    from huggingface_hub import constants

    fake_hub.stop()  # and the Hub is gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    assert hub_download.resolve_model("org/base") == folder
    assert (folder / "model.safetensors").read_bytes() == b"w" * 100
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/never-downloaded")
    text = _assert_one_line(err.value)
    assert "org/never-downloaded is not in the local cache and the Hub is unreachable (offline" in text


def test_unreachable_hub_falls_back_to_the_cache(fake_hub):
    fake_hub.add_repo("org/base", {"config.json": b"{}", "model.safetensors": b"w" * 100})
    folder = hub_download.resolve_model("org/base")
    fake_hub.stop()
    assert hub_download.resolve_model("org/base") == folder
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/other")
    text = _assert_one_line(err.value)
    assert "not in the local cache and the Hub is unreachable" in text
    assert "cannot reach" in text and fake_hub.url.split("//")[1] in text


def test_download_missing_repo_404(fake_hub):
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("nobody/missing")
    text = _assert_one_line(err.value)
    assert "no such model repo" in text and "nobody/missing" in text


def test_download_missing_revision(fake_hub):
    fake_hub.add_repo("org/base", {"config.json": b"{}", "model.safetensors": b"w"})
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/base", revision="no-such-branch")
    text = _assert_one_line(err.value)
    assert "no revision 'no-such-branch' in org/base" in text


def test_download_private_repo_needs_the_token(fake_hub):
    fake_hub.add_repo("org/private", {"config.json": b"{}", "model.safetensors": b"w"}, private=True)
    assert (hub_download.resolve_model("org/private") / "model.safetensors").read_bytes() == b"w"  # HF_TOKEN is right
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/private", token=WRONG, revision="main")
    assert "rejected the token (401)" in _assert_one_line(err.value)


@pytest.mark.parametrize("where", ["/api/models/org/gated", "/org/gated/resolve/"])
def test_download_gated_repo(fake_hub, where):
    fake_hub.add_repo("org/gated", {"config.json": b"{}", "model.safetensors": b"w"})
    fake_hub.fail.append((where, 403, "GatedRepo", "Access to model org/gated is restricted"))
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/gated")
    assert "org/gated is gated" in _assert_one_line(err.value)


def test_push_without_any_token_says_so_before_any_request(fake_hub, make_checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(WinaError) as err:
        hub_push.push(make_checkpoint(), "alice/x", quiet=True)
    assert "needs a Hugging Face token" in _assert_one_line(err.value)
    assert fake_hub.requests == []
    assert hub_push.push(make_checkpoint(), "alice/x", dry_run=True, quiet=True).dry_run  # a dry run needs none


def test_download_refuses_pickle_only_repos(fake_hub):
    fake_hub.add_repo("org/old", {"config.json": b"{}", "pytorch_model.bin": b"pickle!"})
    with pytest.raises(WinaError) as err:
        hub_download.resolve_model("org/old")
    text = _assert_one_line(err.value)
    assert ".bin" in text and "security" in text
    assert not [p for p in fake_hub.paths_requested() if p.endswith(".bin")]


def test_load_needs_a_wina_checkpoint(fake_hub):
    fake_hub.add_repo("org/plain", {"config.json": b"{}", "model.safetensors": b"w"})
    with pytest.raises(WinaError, match="not a WINA checkpoint"):
        hub_download.resolve_model("org/plain", purpose="load")


@pytest.mark.parametrize("name", ["./nope", "../nope", "/no/such/dir", "~/no-such-wina-dir", "model.gguf",
                                  "a/b/c"])
def test_missing_local_paths_are_not_hub_ids(fake_hub, name):
    with pytest.raises(WinaError, match="no such file or directory"):
        hub_download.resolve_model(name)
    assert fake_hub.requests == []


def test_local_paths_are_returned_as_is(fake_hub, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert hub_download.resolve_model(str(tmp_path)) == tmp_path
    assert hub_download.resolve_model(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    assert fake_hub.requests == []


def test_hub_revision():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert hub_download.hub_revision(Path(f"/c/models--a--b/snapshots/{sha}")) == sha
    assert hub_download.hub_revision(Path("/some/local/dir")) is None


# --------------------------------------------------------------------------- model card

def _front_matter(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_model_card_metadata_and_body(make_checkpoint):
    ckpt = make_checkpoint()
    card = hub_card.model_card(ckpt, "alice/tiny-wina")
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"wina", "activation-sparsity", "sparsity", "text-generation", "llama"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "wina-convert"  # transformed: plain transformers must not load it
    assert hub_card.MARKER in card
    assert "2505.19427" in card and "Weight-Informed Neuron Activation" in card
    assert "| attention_input | 49.0 % |" in card and "| overall | 50.0 % |" in card
    assert "13.57" in card and "12.34" in card and "| samples | 16 |" in card
    assert "pip install wina-convert" in card
    assert 'model = wina_convert.load("alice/tiny-wina")' in card
    assert 'AutoTokenizer.from_pretrained("alice/tiny-wina")' in card and "model.generate(" in card
    # the load snippet is valid Python
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "<card>", "exec")


def test_model_card_without_license_calibration_or_hub_base(make_checkpoint):
    ckpt = make_checkpoint(license=None, transform=False, calibration=None, eval=None,
                           base_model={"id": "model-q8.gguf", "revision": None, "sha256": "ab" * 32})
    card = hub_card.model_card(ckpt)
    meta = _front_matter(card)
    assert "license" not in meta
    assert "base_model" not in meta  # a local .gguf is not a Hub repo
    assert meta["library_name"] == "transformers"  # untransformed: plain transformers loads it dense
    assert "## Calibration" not in card and "## Evaluation" not in card
    assert "ab" * 32 in card
    assert f'wina_convert.load("{ckpt.name}")' in card


def test_write_model_card_keeps_user_cards(make_checkpoint):
    ckpt = make_checkpoint(card=False)
    path = hub_card.write_model_card(ckpt)
    assert hub_card.MARKER in path.read_text()
    (ckpt / "README.md").write_text(path.read_text().replace("wina_convert.load", "my_load"))
    hub_card.write_model_card(ckpt, "alice/x")  # still ours (marker kept): regenerated
    assert 'wina_convert.load("alice/x")' in (ckpt / "README.md").read_text()
    (ckpt / "README.md").write_text("# hand written\n")
    hub_card.write_model_card(ckpt, "alice/x")
    assert (ckpt / "README.md").read_text() == "# hand written\n"


def test_model_card_during_convert_uses_final_name(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(name=".smol-wina.wina-partial-abc123", card=False)
    assert 'wina_convert.load("smol-wina")' in hub_card.model_card(ckpt)


@pytest.mark.skipif(not hasattr(__import__("huggingface_hub").HfApi, "upload_large_folder"),
                    reason="huggingface_hub 2.x has no upload_large_folder (its upload_folder is resumable)")
def test_large_checkpoints_use_upload_large_folder(fake_hub, make_checkpoint, monkeypatch):
    monkeypatch.setattr(hub_push, "LARGE_FOLDER_BYTES", 0)  # every checkpoint counts as large
    calls = []
    from huggingface_hub import HfApi

    original = HfApi.upload_large_folder
    monkeypatch.setattr(HfApi, "upload_large_folder", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    ckpt = make_checkpoint()
    (ckpt / "stray.txt").write_text("x")
    result = hub_push.push(ckpt, "alice/large", quiet=True)
    assert calls and calls[0]["repo_id"] == "alice/large"
    remote = fake_hub.files("alice/large")
    assert set(remote) == set(result.files) | {".gitattributes"}
    for name in result.files:
        assert remote[name] == (ckpt / name).read_bytes(), name
