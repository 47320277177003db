"""``wina push``: upload a verified WINA checkpoint, with its model card, to a Hub model repo.

Uploads go through ``upload_folder``: with ``hf_xet`` installed huggingface_hub uses the Xet protocol
(2.x: streamed, multi-commit, resumable), without it, or with ``HF_HUB_DISABLE_XET=1``, the Git LFS
batch API. huggingface_hub 2.x has no ``upload_large_folder`` (its ``upload_folder`` is already
resumable with Xet); on versions that have it (0.34 to 1.x), checkpoints above ``LARGE_FOLDER_BYTES``
go through ``upload_large_folder`` unless ``create_pr`` is asked for. ``upload_large_folder`` writes
its own commit messages, so ``commit_message`` is then not used (a note says so).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.format import MANIFEST, manifest_files, verify_checkpoint
from ..errors import WinaError
from ..units import human_size, percent
from ..version import __version__
from .card import is_generated_card, model_card, write_model_card
from .errors import check_repo_id, endpoint_url, hub_errors, progress_bars, saved_token

LARGE_FOLDER_BYTES = 5 * 1024**3


@dataclass
class PushResult:
    url: str
    repo_id: str
    revision: str | None
    files: list[str] = field(default_factory=list)
    dry_run: bool = False


def push(path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
         dry_run: bool = False, quiet: bool = False, endpoint: str | None = None) -> PushResult:
    """Upload the WINA checkpoint in ``path`` to the Hub model repo ``repo_id``.

    The directory is verified first (manifest sizes and hashes); the model card is refreshed
    (unless README.md is the user's own); the repo is created when missing (``private`` on
    request) and the branch ``revision`` when it does not exist. Only the checkpoint's files are
    uploaded: those of the manifest, README.md and the manifest. ``token``: else ``$HF_TOKEN``,
    else the saved login. ``dry_run`` lists what would be uploaded and where, without any request.
    """
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    path = Path(os.path.expanduser(str(path)))
    token = token or None
    endpoint = endpoint_url(endpoint)
    check_repo_id(repo_id)
    if revision in ("", "main"):
        revision = None
    if create_pr and revision is not None:
        raise WinaError("--create-pr opens a pull request against main: drop --revision, or push to the branch without --create-pr")
    wina = verify_checkpoint(path)

    files = manifest_files(path)
    readme = path / "README.md"
    card_is_ours = not readme.exists() or is_generated_card(readme)
    if dry_run:
        card_size = len(model_card(path, repo_id).encode("utf-8")) if card_is_ours else readme.stat().st_size
    else:
        write_model_card(path, repo_id)
        card_size = readme.stat().st_size
    uploads = files + ["README.md", MANIFEST]
    sizes = {name: (card_size if name == "README.md" else (path / name).stat().st_size) for name in uploads}
    total = sum(sizes.values())
    url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    where = f"{url}{' (private)' if private else ''}{' as a pull request' if create_pr else ''}"

    if dry_run:
        console.print(f"dry run: would upload {len(uploads)} files ({human_size(total)}) to {where}")
        for name in uploads:
            note = "" if name != "README.md" else (" (generated card)" if card_is_ours else " (your card, kept)")
            console.print(f"  {human_size(sizes[name]):>10}  {name}{note}")
        return PushResult(url=url, repo_id=repo_id, revision=revision, files=uploads, dry_run=True)

    from huggingface_hub import HfApi

    if token is None and not saved_token():
        raise WinaError("pushing needs a Hugging Face token with write access: pass --token, set HF_TOKEN "
                        "or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or (f"Upload WINA checkpoint (target sparsity {percent(wina.get('target_sparsity'), space=True)}) "
                                 f"with wina-convert {__version__}")
    patterns = [glob.escape(name) for name in uploads]
    console.print(f"pushing {len(uploads)} files ({human_size(total)}) to {where}")
    with progress_bars(quiet), hub_errors(action="push to", repo_id=repo_id, revision=revision, token=token,
                                             endpoint=endpoint):
        # private=None (not False) for a public repo: no visibility field, the namespace's default applies.
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        large = hasattr(api, "upload_large_folder") and total > LARGE_FOLDER_BYTES and not create_pr
        if large:
            if commit_message:
                console.print("[yellow]note: a large checkpoint is uploaded with upload_large_folder (resumable), "
                              "which writes its own commit messages: --commit-message is not used[/]")
            api.upload_large_folder(repo_id=repo_id, folder_path=path, repo_type="model", revision=revision,
                                    allow_patterns=patterns)
            commit = None
        else:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=path, repo_type="model", revision=revision,
                allow_patterns=patterns, commit_message=message, create_pr=create_pr,
                # Shards of an earlier push with another shard count would linger beside the new ones.
                delete_patterns=["model-*-of-*.safetensors"],
            )
    pr_url = getattr(commit, "pr_url", None) if commit is not None else None
    if pr_url:
        url = str(pr_url)
    console.print(f"pushed {len(uploads)} files to {url}")
    return PushResult(url=url, repo_id=repo_id, revision=revision, files=uploads, dry_run=False)
