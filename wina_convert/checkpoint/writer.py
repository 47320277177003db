"""Writing a checkpoint: weights into safetensors shards as they come, in a directory that appears only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import WinaError, one_line
from .format import DTYPE_NAMES, INDEX, MANIFEST, TMP_MARK, manifest_files, sha256_file


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each, as they come.

    ``add`` puts the tensor's bytes on disk at once, so the writer holds nothing between calls:
    converting a model never materializes it, whatever the shard size. A safetensors file starts
    with its header (names, shapes, offsets), known only once the shard is complete, so a shard's
    data starts after ``header_reserve`` bytes and closing it writes the header there, padded
    with spaces (which the format allows). A header that outgrows the reservation (thousands of
    tensors in one shard) makes the close rewrite the shard once with room for it.

    Each closed shard is hashed (sha256, for the manifest) in a background thread while the
    conversion goes on. Shards get their final ``model-0000k-of-0000n`` names in ``finish``,
    once ``n`` is known.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, header_reserve: int = 1 << 16, keep: bool = False):
        self.directory = directory
        self.keep = keep
        self.kept: dict[str, torch.Tensor] = {}  # with ``keep``: every tensor written, by name (CPU), to run the model
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = -(-header_reserve // 8) * 8
        self.total_bytes = 0
        self._file: Any = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wina-sha256")
        self._hashes: list[Future] = []
        self.sha256: dict[str, str] = {}  # final shard name -> sha256, filled by ``finish``

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        given = tensor
        tensor = tensor.detach().cpu().contiguous()
        if self.keep:  # a copy where the caller's tensor is the one written (the calibrator consumes it next)
            self.kept[name] = tensor.clone() if tensor.data_ptr() == given.data_ptr() else tensor
        if tensor.dtype not in DTYPE_NAMES:
            raise WinaError(f"cannot write {name!r}: safetensors has no dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        if self._file is not None and self._entries and (
            self._offset + size > self.max_shard_bytes or self._offset % tensor.element_size()
        ):
            self._close()
        if self._file is None:
            self._open()
        self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._names.add(name)
        self._offset += size
        self.total_bytes += size

    def _open(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        self._file = open(path, "wb")
        self._file.seek(8 + self.header_reserve)
        self._offset = 0

    def _close(self) -> None:
        file, self._file = self._file, None
        path = Path(file.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) <= self.header_reserve:
            file.seek(0)
            file.write(self.header_reserve.to_bytes(8, "little") + header.ljust(self.header_reserve, b" "))
            file.close()
        else:
            file.close()
            _rewrite_with_header(path, header, 8 + self.header_reserve)
        self._shards.append((path, list(self._entries)))
        self._hashes.append(self._hasher.submit(sha256_file, path))
        self._entries = {}

    def finish(self) -> list[str]:
        """Close the last shard, name the shards, write the index; return the shard names."""
        if self._file is not None:
            self._close()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        names = []
        for i, ((path, tensors), digest) in enumerate(zip(self._shards, self._hashes)):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self.sha256[name] = digest.result()
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        self._hasher.shutdown()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _rewrite_with_header(path: Path, header: bytes, data_start: int) -> None:
    """Rewrite a shard whose data starts at ``data_start`` with ``header`` (8-byte aligned) in front."""
    header = header.ljust(-(-len(header) // 8) * 8, b" ")
    moved = path.with_name(path.name + ".moving")
    with open(path, "rb") as src, open(moved, "wb") as dst:
        dst.write(len(header).to_bytes(8, "little") + header)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(moved, path)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(target: Path, protected: Iterable[Path]) -> None:
    """Refuse a ``target`` that is one of ``protected`` or contains one (see ``check_replaceable``)."""
    real = _resolved(target)
    for path in protected:
        path = _resolved(path)
        if path == real:
            raise WinaError(f"output {target} is the input model: choose another -o")
        if path.is_relative_to(real):
            raise WinaError(f"output {target} contains the input model ({path}): choose another -o")


def check_replaceable(target: Path, protected: Iterable[Path] = ()) -> None:
    """Refuse (one-line ``WinaError``) to replace ``target`` unless nothing of the user's can be lost.

    ``protected`` are the paths of the input (the model directory or .gguf file, and the files it
    was read from, e.g. a Hub cache snapshot and its blobs): ``target`` must be none of them and
    contain none of them (``-o ~/models`` when the model lives in ``~/models/llama``). Paths are
    compared resolved (symlinks followed), so another spelling of the same directory is caught.
    A non-empty ``target`` may only be an earlier WINA checkpoint: ``config.json`` with a ``wina``
    block, ``wina-manifest.json``, and no file that the manifest does not list (its model card
    aside). Anything else is data this run did not write and will not delete.
    """
    check_not_input(target, protected)
    if not target.is_dir() or not any(target.iterdir()):
        return
    config = target / "config.json"
    try:
        wina = json.loads(config.read_text()).get("wina") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        wina = None
    if not isinstance(wina, dict) or not (target / MANIFEST).is_file():
        raise WinaError(f"refusing to replace {target}: it is not empty and not a WINA checkpoint "
                        f"(no {MANIFEST} or no wina block in config.json); choose another -o or empty it yourself")
    try:
        listed = set(manifest_files(target))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WinaError(f"refusing to replace {target}: its {MANIFEST} is unreadable ({one_line(e)})") from e
    listed |= {MANIFEST, "README.md"}
    extra = sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                   if not p.is_dir() and p.relative_to(target).as_posix() not in listed)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise WinaError(f"refusing to replace {target}: it holds files that its {MANIFEST} does not list "
                        f"({', '.join(extra[:3])}{more}); move them away or choose another -o")


class OutputDir:
    """A temporary directory beside the target, renamed into place only when complete.

    An interrupted conversion leaves a ``.<name>.wina-partial-*`` directory, never one that looks
    like a checkpoint; the next run reports and removes it. An existing target is replaced only
    with ``overwrite`` and only when ``check_replaceable`` allows it (an empty directory or an
    earlier WINA checkpoint, never the input or a directory that holds it); everything is checked
    in ``__init__`` (and ``protect``), before anything on disk is touched.
    """

    def __init__(self, target: Path, overwrite: bool = False, protected: Iterable[Path] = ()):
        self.target = target
        self.overwrite = overwrite
        if target.exists() and not target.is_dir():
            raise WinaError(f"output {target} exists and is not a directory")
        self.protect(protected)
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise WinaError(f"output directory {target} is not empty: choose another -o or pass --overwrite")
        self.stale = sorted(target.parent.glob(f".{target.name}{TMP_MARK}*")) if target.parent.exists() else []

    def protect(self, protected: Iterable[Path]) -> None:
        """Refuse the target if it is, or contains, one of ``protected`` (paths known only later, e.g. a
        Hub snapshot); with ``overwrite``, also refuse a non-empty target that is not a WINA checkpoint."""
        if self.overwrite:
            check_replaceable(self.target, protected)
        else:
            check_not_input(self.target, protected)

    def __enter__(self) -> Path:
        for stale in self.stale:
            shutil.rmtree(stale, ignore_errors=True)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{TMP_MARK}", dir=self.target.parent))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.wina-old-", dir=self.target.parent))
            os.replace(self.target, old)  # onto the empty directory just made: a name nobody else uses
            self.path.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.target)

