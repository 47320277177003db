"""Downloading from the Hub only what a command needs: ``wina convert`` (safetensors weights, configs,
tokenizer files; pickle weights refused) and ``wina load`` (the files of the checkpoint's manifest).

``HF_HUB_OFFLINE`` and the cache are honoured: offline, or with the Hub unreachable, the cached
snapshot is used. Works with huggingface_hub 0.34 to 2.x.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from ..checkpoint.format import INDEX, MANIFEST, SIDECAR
from ..errors import WinaError
from .errors import HUB_ID, endpoint_url, hub_errors, is_network_error, root_cause, scrubbed_line

# What `wina convert` reads from a Hub repo: weights (safetensors only), configs, tokenizer files.
CONVERT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template*",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _looks_local(model: str) -> bool:
    """A path, not a Hub id: ./x, ../x, /x, ~/x, x.gguf, a/b/c, C:\\x."""
    return (model.startswith((".", "/", "~", "\\")) or model.endswith(".gguf") or model.count("/") > 1
            or "\\" in model or (len(model) > 1 and model[1] == ":"))


def resolve_model(model: str, *, revision: str | None = None, token: str | None = None,
                  purpose: str = "convert", endpoint: str | None = None) -> Path:
    """A local path as is, or a Hub repo downloaded (only what ``purpose`` needs) into the HF cache.

    ``purpose="convert"``: safetensors weights (only the shards of the index when there is one),
    config, generation config, tokenizer files. ``purpose="load"``: the files of the WINA
    checkpoint's manifest. ``.bin``/pickle weights are refused. ``HF_HUB_OFFLINE`` and the cache
    are honoured: offline, or with the Hub unreachable, the cached snapshot is returned.
    """
    if purpose not in ("convert", "load"):
        raise ValueError(f"purpose must be 'convert' or 'load', not {purpose!r}")
    text = str(model)
    path = Path(os.path.expanduser(text))
    if path.exists():
        return path
    if _looks_local(text) or not HUB_ID.match(text):
        raise WinaError(f"no such file or directory: {text}")
    token = token or None
    endpoint = endpoint_url(endpoint)
    with hub_errors(action="download", repo_id=text, revision=revision, token=token, endpoint=endpoint):
        return _download(text, revision=revision, token=token, purpose=purpose, endpoint=endpoint)


def _download(repo_id: str, *, revision: str | None, token: str | None, purpose: str, endpoint: str) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    def offline_snapshot(cause: BaseException) -> Path:
        # The Hub cannot be asked what the repo holds: use the cached snapshot of this revision.
        try:
            folder = snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                       local_files_only=True, allow_patterns=["config.json"])
        except Exception as e:
            offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            if offline_env or getattr(constants, "HF_HUB_OFFLINE", False):
                why = "offline: HF_HUB_OFFLINE is set"
            else:
                why = f"cannot reach {endpoint}: {scrubbed_line(cause, token, 120)}"
            raise WinaError(f"{repo_id} is not in the local cache and the Hub is unreachable ({why})") from e
        return Path(folder)

    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as e:
        root = root_cause(e)
        offline_cls = getattr(hf_errors, "OfflineModeIsEnabled", ())
        if (offline_cls and isinstance(root, offline_cls)) or is_network_error(root):
            return _check_local(offline_snapshot(root), repo_id, purpose)
        raise
    sha = info.sha
    names = [s.rfilename for s in (info.siblings or [])]
    top = [n for n in names if "/" not in n]

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=sha or revision, token=token, endpoint=endpoint))

    if purpose == "load":
        if MANIFEST not in top:
            raise WinaError(f"{repo_id} is not a WINA checkpoint (no {MANIFEST} in the repo): convert it with `wina convert` first")
        manifest = json.loads(fetch(MANIFEST).read_text())
        wanted = sorted(manifest.get("files", {})) + [MANIFEST]
    else:
        weights = _weight_files(repo_id, top, fetch)
        wanted = weights + [n for n in top if n not in weights and _matches(n, CONVERT_PATTERNS)
                            and not n.endswith((".safetensors", ".safetensors.index.json"))]
    folder = Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                    allow_patterns=[glob.escape(n) for n in wanted]))
    return folder


def _matches(name: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, p) for p in patterns)


def _weight_files(repo_id: str, top: list[str], fetch) -> list[str]:
    """The safetensors files to download: the index and its shards, or model.safetensors, or all."""
    if INDEX in top:
        index = json.loads(fetch(INDEX).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in top]
        if missing:
            raise WinaError(f"{repo_id} is incomplete: its {INDEX} names {missing[0]}, which is not in the repo")
        return [INDEX] + shards
    if "model.safetensors" in top:
        return ["model.safetensors"]
    safetensors = [n for n in top if n.endswith(".safetensors") and n != SIDECAR]
    if safetensors:
        return safetensors
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise WinaError(f"{repo_id} has only .bin/pickle weights ({pickles[0]}): wina-convert refuses pickle checkpoints "
                        "for security (loading them can run arbitrary code); use a repo with .safetensors weights")
    ggufs = [n for n in top if n.endswith(".gguf")]
    if ggufs:
        raise WinaError(f"{repo_id} has .gguf files but no safetensors weights: download the .gguf you want "
                        "(e.g. `hf download` it) and pass its path")
    raise WinaError(f"{repo_id} has no safetensors weights")


def _check_local(folder: Path, repo_id: str, purpose: str) -> Path:
    """An offline snapshot must hold what ``purpose`` needs (downloaded earlier)."""
    if purpose == "convert" and not any(folder.glob("*.safetensors")):
        if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
            raise WinaError(f"{repo_id} has only .bin/pickle weights: wina-convert refuses pickle checkpoints for security")
        raise WinaError(f"{repo_id} is not in the local cache and the Hub is unreachable (offline): "
                        "the cached snapshot has no safetensors weights")
    if purpose == "load" and not (folder / MANIFEST).is_file():
        raise WinaError(f"{repo_id} is not in the local cache and the Hub is unreachable (offline): "
                        f"the cached snapshot has no {MANIFEST}")
    return folder


def hub_revision(path: str | os.PathLike) -> str | None:
    """The commit sha of a Hub download (the cache's ``snapshots/<sha>`` folder), else None."""
    p = Path(path)
    for candidate in (p, p.parent):
        if candidate.parent.name == "snapshots" and COMMIT.match(candidate.name):
            return candidate.name
    return None
