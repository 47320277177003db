"""Reading models (streamed, memory-mapped) and writing WINA checkpoints.

A WINA checkpoint is a directory::

    config.json                       transformers config + a versioned ``wina`` block
    model-0000k-of-0000n.safetensors  the weights, sharded
    model.safetensors.index.json      tensor -> shard map
    wina.safetensors                  the sidecar: per-gate column norms, quantile tables, allocation
    tokenizer files, generation_config.json, README.md (model card)
    wina-manifest.json                size + sha256 of every other file; written last

A transformed checkpoint carries ``model_type: "wina-convert"``, so that plain transformers
refuses it with an error naming wina-convert instead of running rotated weights without their
shortcut rotations. Without the transform the base model type is kept: any transformers runs it
dense.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import WinaError

FORMAT_VERSION = 1
WINA_MODEL_TYPE = "wina-convert"
SIDECAR = "wina.safetensors"
MANIFEST = "wina-manifest.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TMP_MARK = ".wina-partial-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(chunk)  # one reused buffer: hashing a 5 GB shard allocates nothing per block
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def weights_sha256(files: list[Path]) -> str:
    """Identity of local weights: sha256 of the sorted ``name sha256(file)`` lines of its files."""
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in sorted(set(files), key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise WinaError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16")
    return table[name]


# --------------------------------------------------------------------------- reading

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file, read one tensor at a time into memory that the tensor owns.

    Deliberately not memory-mapped: every page of a mapping that a tensor touched counts in the
    process's resident memory for as long as the mapping lives, so walking a 16 GB model through
    ``safe_open`` ends with 16 GB resident. A positioned read copies from the page cache instead
    (one memcpy, the same work ``.to()`` would do), and the memory goes when the tensor does.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= os.path.getsize(path) - 8:
                    raise ValueError(f"header length {length} does not fit in the file")
                header = json.loads(f.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise WinaError(f"{path} is not a valid safetensors file: {_one_line(e)} (corrupt or truncated?)") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length

    def dtype(self, name: str) -> torch.dtype | None:
        return DTYPES.get(self.entries[name]["dtype"])

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:  # a dtype this reader does not know: let safetensors decode it
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(name).clone()
        start, stop = entry["data_offsets"]
        data = torch.empty(stop - start, dtype=torch.uint8)
        view = memoryview(data.numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            done = 0
            while done < len(view):
                count = f.readinto(view[done:])
                if not count:
                    raise OSError(f"file ends {len(view) - done} bytes early")
                done += count
        return data.view(dtype).reshape(entry["shape"])


@dataclass
class Source:
    """A model to convert: its config and a way to read one tensor at a time.

    ``tensor(name)`` reads one tensor from its safetensors file (see ``SafetensorsFile``), so a
    converter that walks the layers holds one layer at a time, never the whole model.
    """

    config: Any  # transformers.PretrainedConfig, without quantization_config
    base: dict[str, Any]  # {"id", "revision", "sha256"}
    tokenizer_source: Any  # a directory with tokenizer files, or a tokenizer object
    generation_config: Any | None
    _files: dict[str, Path] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _handles: dict[Path, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self._tensors) if self._tensors else list(self._files)

    def has(self, name: str) -> bool:
        return name in self._tensors or name in self._files

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh copy of tensor ``name``, owned by the caller (who may modify it in place)."""
        if name in self._tensors:
            return self._tensors[name].clone()
        if name not in self._files:
            raise WinaError(f"the checkpoint has no tensor {name!r}: config and weights do not match")
        path = self._files[name]
        try:
            return self._file(path).read(name)
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            raise WinaError(f"cannot read {name!r} from {path.name}: {_one_line(e)} (corrupt or truncated file?)") from e

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    def dtype_of(self, name: str) -> torch.dtype | None:
        """The stored dtype of a tensor, from the file's header (nothing is read)."""
        if name in self._tensors:
            return self._tensors[name].dtype
        return self._file(self._files[name]).dtype(name) if name in self._files else None

    @property
    def dtype(self) -> torch.dtype:
        for name in self.names:
            if name.endswith("embed_tokens.weight"):
                return self.dtype_of(name) or torch.float32
        return torch.float32


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _load_config(directory: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.is_file():
        raise WinaError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WinaError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if raw.get("model_type") == WINA_MODEL_TYPE or "wina" in raw:
        raise WinaError(f"{directory} is already a WINA checkpoint (made by wina-convert); convert the base model instead")
    from .arch import adapter_for

    adapter_for(raw.get("model_type", "<missing model_type>"))
    if raw.get("auto_map") and not trust_remote_code:
        raw.pop("auto_map")
    try:
        return AutoConfig.for_model(**raw)
    except Exception as e:  # transformers raises many types for bad configs
        raise WinaError(f"cannot read {path}: {_one_line(e)}") from e


def _safetensors_files(directory: Path) -> dict[str, Path]:
    index = directory / INDEX
    files: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WinaError(f"{index} is not a valid safetensors index: {_one_line(e)}") from e
        for name, shard in weight_map.items():
            if not (directory / shard).is_file():
                raise WinaError(f"{directory} is incomplete: shard {shard} listed in {INDEX} is missing")
            files[name] = directory / shard
        return files
    shards = sorted(directory.glob("*.safetensors"))
    shards = [s for s in shards if s.name != SIDECAR]
    if not shards:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
            raise WinaError(
                f"{directory} holds only pickle (.bin/.pt) weights, which wina-convert refuses to read for "
                "security: convert them to safetensors first"
            )
        raise WinaError(f"{directory} has no .safetensors weights")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    files[name] = shard
        except (SafetensorError, OSError) as e:
            raise WinaError(f"{shard} is not a valid safetensors file: {_one_line(e)} (corrupt or truncated?)") from e
    return files


def open_directory(directory: Path, *, model_id: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> Source:
    """A local Hugging Face directory (safetensors, sharded or not)."""
    from transformers import GenerationConfig

    config = _load_config(directory, trust_remote_code)
    files = _safetensors_files(directory)
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        generation = None
    base = {"id": model_id or directory.name, "revision": revision, "sha256": None}
    return Source(config=config, base=base, tokenizer_source=directory, generation_config=generation, _files=files)


def open_gguf(path: Path) -> Source:
    """A .gguf file, dequantized through transformers (needs the gguf package).

    The whole model is materialized in float32: GGUF inputs are small models in practice.
    """
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise WinaError("reading .gguf files needs the gguf package: pip install 'wina-convert[gguf]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kwargs = {"gguf_file": path.name}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except WinaError:
        raise
    except ImportError as e:
        raise WinaError(f"reading .gguf files needs extra packages: {_one_line(e)}") from e
    except Exception as e:  # gguf/transformers raise many types for bad files
        raise WinaError(f"cannot read {path}: {_one_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    from .arch import adapter_for

    adapter_for(model.config.model_type)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    generation = model.generation_config
    base = {"id": path.name, "revision": None, "sha256": sha256_file(path)}
    return Source(config=config, base=base, tokenizer_source=tokenizer, generation_config=generation, _tensors=tensors)


def open_source(model: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                trust_remote_code: bool = False) -> Source:
    """A Hub id, a local Hugging Face directory or a .gguf file."""
    path = Path(os.path.expanduser(str(model)))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WinaError(f"no such file: {model}")
        return open_gguf(path)
    if path.is_dir():
        return open_directory(path, revision=revision, trust_remote_code=trust_remote_code)
    if path.exists():
        raise WinaError(f"{model} is neither a model directory nor a .gguf file")
    from .hub import hub_revision, resolve_model

    local = resolve_model(str(model), revision=revision, token=token, purpose="convert")
    if local.is_file():
        return open_gguf(local)
    return open_directory(local, model_id=str(model), revision=hub_revision(local) or revision,
                          trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- writing

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

    def __init__(self, directory: Path, max_shard_bytes: int, header_reserve: int = 1 << 16):
        self.directory = directory
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
        tensor = tensor.detach().cpu().contiguous()
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


def write_manifest(directory: Path, known: dict[str, str] | None = None) -> None:
    """sha256 of every file but the model card; written last, so its presence means complete.

    ``known`` maps file names to hashes already computed (the shards, hashed as they were closed).
    """
    known = known or {}
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in (MANIFEST, "README.md"):
            files[rel] = {"size": path.stat().st_size, "sha256": known.get(rel) or sha256_file(path)}
    manifest = {"format_version": FORMAT_VERSION, "tool_version": __version__, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class OutputDir:
    """A temporary directory beside the target, renamed into place only when complete.

    An interrupted conversion leaves a ``.<name>.wina-partial-*`` directory, never one that looks
    like a checkpoint; the next run reports and removes it.
    """

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = target
        self.overwrite = overwrite
        if target.exists() and not target.is_dir():
            raise WinaError(f"output {target} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise WinaError(f"output directory {target} is not empty: choose another -o or pass --overwrite")
        self.stale = sorted(target.parent.glob(f".{target.name}{TMP_MARK}*")) if target.parent.exists() else []

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
            old = self.target.with_name(f".{self.target.name}.wina-old")
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
            self.path.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.target)


# --------------------------------------------------------------------------- sidecar

def write_sidecar(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    meta = {"format_version": FORMAT_VERSION, **meta}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"wina": json.dumps(meta)})


def read_sidecar(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise WinaError(f"{path.parent} has no WINA sidecar ({SIDECAR}): convert the model with `wina convert` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("wina")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WinaError(f"{path} is not a valid sidecar: {_one_line(e)}") from e
    try:
        meta = json.loads(raw or "")
    except json.JSONDecodeError as e:
        raise WinaError(f"{path} has no readable WINA metadata") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise WinaError(f"{path} has sidecar format version {version!r}; this wina-convert reads version {FORMAT_VERSION}: upgrade wina-convert")
    return tensors, meta


# --------------------------------------------------------------------------- verifying

def read_wina_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise WinaError(f"{directory} has no config.json: not a model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WinaError(f"{path} is not valid JSON: {_one_line(e)}") from e
    wina = config.get("wina")
    if not isinstance(wina, dict):
        raise WinaError(f"{directory} is not a WINA checkpoint (config.json has no wina block): run `wina convert` on it first")
    if wina.get("format_version") != FORMAT_VERSION:
        raise WinaError(f"{directory} has WINA format version {wina.get('format_version')!r}; this wina-convert reads version {FORMAT_VERSION}")
    return config


SMALL_FILE = 64 * 1024**2


def verify_checkpoint(directory: Path, *, hashes: bool = True, small_hashes: bool = True) -> dict[str, Any]:
    """Check that a directory is a complete, untouched WINA checkpoint; return its wina block.

    Every file of the manifest must exist with its size and, with ``hashes``, its sha256;
    ``small_hashes`` alone hashes only the files under 64 MB (config, sidecar, tokenizer), which
    catches hand edits at no cost when loading. Every shard of the index must be in the manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WinaError(f"no such checkpoint directory: {directory}")
    config = read_wina_config(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise WinaError(f"{directory} is incomplete: {MANIFEST} is missing (an interrupted conversion?)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WinaError(f"{manifest_path} is not a valid manifest") from e
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise WinaError(f"{directory} is incomplete: {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise WinaError(f"{directory}/{name} has changed since conversion (size differs from {MANIFEST})")
        check = hashes or (small_hashes and entry["size"] < SMALL_FILE)
        if check and sha256_file(path) != entry["sha256"]:
            raise WinaError(f"{directory}/{name} has changed since conversion (sha256 differs from {MANIFEST})")
    if SIDECAR not in files:
        raise WinaError(f"{directory} has no WINA sidecar ({SIDECAR})")
    index = json.loads((directory / INDEX).read_text()) if (directory / INDEX).is_file() else None
    if index is None or INDEX not in files:
        raise WinaError(f"{directory} is incomplete: {INDEX} is missing")
    for shard in set(index["weight_map"].values()):
        if shard not in files:
            raise WinaError(f"{directory} is incomplete: shard {shard} is not in {MANIFEST}")
    return config["wina"]


def iter_checkpoint_tensors(directory: Path) -> Iterator[tuple[str, Path]]:
    index = json.loads((directory / INDEX).read_text())
    yield from ((name, directory / shard) for name, shard in index["weight_map"].items())
