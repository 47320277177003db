"""Hub failures as one WinaError line: the cause named, any token scrubbed; and what a repo id may be.

Every failure of ``huggingface_hub`` (and httpx, requests underneath) reaches the user as one
:class:`~wina_convert.errors.WinaError` line naming the cause, with any token scrubbed from it.
``HF_ENDPOINT`` is read by huggingface_hub once, at import time, into ``constants.ENDPOINT``;
``endpoint_url`` reads it again at call time (``$HF_ENDPOINT``, else ``constants.ENDPOINT``) and the
hub modules pass it explicitly as ``endpoint=`` everywhere, so that a mirror or a test server chosen
after import is honoured.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

from ..errors import WinaError, one_line

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def endpoint_url(endpoint: str | None = None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def token_candidates(token: str | None) -> list[str]:
    """Every token that may be in use, to scrub from messages: explicit, environment, saved login."""
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        found.append(get_token())
    except Exception:  # a broken token file must not turn an error report into another error
        pass
    return sorted({t for t in found if isinstance(t, str) and len(t) >= 4}, key=len, reverse=True)


def saved_token() -> str | None:
    """The token huggingface_hub would use without --token: $HF_TOKEN, else the saved login."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def scrub(text: str, token: str | None) -> str:
    for secret in token_candidates(token):
        text = text.replace(secret, "***")
    return TOKEN_LIKE.sub("hf_***", text)


def scrubbed_line(e: BaseException | str, token: str | None, limit: int = 240) -> str:
    """``one_line(e)`` with every token scrubbed, cut to ``limit`` characters."""
    text = scrub(one_line(e), token)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def http_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def server_message(e: BaseException) -> str:
    message = getattr(e, "server_message", None)
    if message:
        return str(message)
    response = getattr(e, "response", None)
    try:
        data = response.json() if response is not None else None
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except Exception:
        pass
    return ""


def is_network_error(e: BaseException) -> bool:
    """Connection refused, DNS failure, timeout... in httpx, httpx2 (huggingface_hub 1.x/2.x) or requests."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    names = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
             "NetworkError", "ReadError", "WriteError", "RemoteProtocolError", "TransportError", "ConnectionError",
             "Timeout", "ProxyError", "SSLError"}
    for cls in type(e).__mro__:
        if cls.__name__ in names and cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore"):
            return True
    return False


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception that says more than a wrapper (e.g. RuntimeError('Error while uploading'))."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or e.__context__
        if inner is None or http_status(e) is not None or is_network_error(e):
            return e
        e = inner
    return e


def hub_error(e: BaseException, *, action: str, repo_id: str, revision: str | None = None,
              token: str | None = None, endpoint: str | None = None) -> WinaError:
    """One WinaError line for a failure of ``action`` (``"push to"`` or ``"download"``) on ``repo_id``."""
    from huggingface_hub import errors as hf_errors

    write = action.startswith("push")
    endpoint = endpoint_url(endpoint)
    root = root_cause(e)
    offline_cls = getattr(hf_errors, "OfflineModeIsEnabled", ())
    if offline_cls and isinstance(root, offline_cls):
        if write:
            return WinaError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set (unset it to reach the Hub)")
        return WinaError(f"{repo_id} is not in the local cache and the Hub is unreachable (offline: HF_HUB_OFFLINE is set)")
    if is_network_error(root):
        return WinaError(f"cannot reach the Hugging Face Hub at {endpoint}: {scrubbed_line(root, token, 160)}")
    status = http_status(root)
    rev = f" (revision {revision})" if revision else ""
    where = f"{repo_id}{rev}"
    name = type(root).__name__
    server = scrubbed_line(server_message(root), token, 160)
    detail = f": {server}" if server else ""
    if name == "GatedRepoError":
        return WinaError(f"{repo_id} is gated: accept its conditions on {endpoint}/{repo_id} and use a token "
                         "that has access (--token / HF_TOKEN / `hf auth login`)")
    if name == "RevisionNotFoundError":
        return WinaError(f"no revision {revision or 'main'!r} in {repo_id} on the Hub")
    if status == 401:
        header = getattr(getattr(root, "response", None), "headers", {}) or {}
        if name == "RepositoryNotFoundError" and header.get("X-Error-Message") != "Invalid credentials in Authorization header":
            # The Hub answers 401 for a repo it does not show to this (anonymous or other) user.
            return WinaError(f"no such model repo on the Hub: {repo_id} (or it is private: use a token that can "
                             "read it: --token / HF_TOKEN / `hf auth login`)")
        return WinaError("the Hub rejected the token (401): check --token / HF_TOKEN / `hf auth login`")
    if status == 403:
        if write:
            return WinaError(f"no permission to write to {repo_id} on the Hub (403){detail}: use a token with write "
                             "access to that namespace")
        return WinaError(f"no permission to read {repo_id} on the Hub (403){detail}")
    if status == 404 or name in ("RepositoryNotFoundError", "RemoteEntryNotFoundError", "EntryNotFoundError"):
        if name in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
            return WinaError(f"a file is missing in {where} on the Hub (404){detail}")
        if revision:
            return WinaError(f"no such model repo or revision on the Hub: {where} (404)")
        if write:
            return WinaError(f"no such model repo on the Hub: {repo_id} (404)")
        return WinaError(f"no such model repo on the Hub: {repo_id} (404), and no local directory of that name")
    if name in ("LocalEntryNotFoundError", "IncompleteSnapshotError"):
        return WinaError(f"{repo_id} is not in the local cache and the Hub is unreachable (offline)")
    if status is not None:
        return WinaError(f"the Hub answered HTTP {status} to {action} {where}{detail or ': ' + scrubbed_line(root, token, 160)}")
    return WinaError(f"cannot {action} {where}: {name}: {scrubbed_line(root, token)}")


@contextmanager
def hub_errors(*, action: str, repo_id: str, revision: str | None, token: str | None,
                endpoint: str | None) -> Iterator[None]:
    try:
        yield
    except WinaError:
        raise
    except Exception as e:  # huggingface_hub, httpx and requests raise many types; all become one line
        error = hub_error(e, action=action, repo_id=repo_id, revision=revision, token=token, endpoint=endpoint)
        # Never chain an exception whose text carries a token: a --debug traceback would print it.
        if any(secret in exception_text(e) for secret in token_candidates(token)):
            raise error from None
        raise error from e


def exception_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{e!s} {e!r}")
        e = e.__cause__ or e.__context__
    return " ".join(parts)


@contextmanager
def progress_bars(quiet: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if quiet and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not HUB_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id \
            or repo_id.endswith((".git", "-", ".")):
        raise WinaError(f"{repo_id!r} is not a Hub repo id: use namespace/name (e.g. your-user/SmolLM2-135M-wina)")


def looks_like_hub_id(name: object) -> bool:
    """A string that can name a Hub repo (``org/name`` or ``name``), not a .gguf file."""
    return isinstance(name, str) and bool(HUB_ID.match(name)) and not name.endswith(".gguf")
