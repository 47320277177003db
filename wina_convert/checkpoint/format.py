"""The WINA checkpoint format: file names, the ``wina`` config block, the sidecar, the manifest, verifying.

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

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import WinaError, one_line
from ..progress import quiet_transformers
from ..version import __version__

FORMAT_VERSION = 2  # 2: config.json's wina block and the sidecar's metadata are one record (WinaRecord)
READABLE_VERSIONS = (1, 2)  # version 1 wrote the same fields, split between the two
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
TMP_MARK = ".wina-partial-"  # an output directory being written: .<name>.wina-partial-*
SMALL_FILE = 64 * 1024**2

# safetensors dtype names
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--dtype`` name (None stays None: keep the input's)."""
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise WinaError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16")
    return table[name]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(chunk)  # one reused buffer: hashing a 5 GB shard allocates nothing per block
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


# --------------------------------------------------------------------------- config.json

def read_config_json(directory: Path, kind: str = "a model directory") -> dict[str, Any]:
    """``directory/config.json`` as a dict; a one-line error if it is missing or not JSON."""
    path = directory / "config.json"
    if not path.is_file():
        raise WinaError(f"{directory} has no config.json: not {kind}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WinaError(f"{path} is not valid JSON: {one_line(e)}") from e


def read_wina_config(directory: Path, *, check_version: bool = True) -> dict[str, Any]:
    """The config.json of a WINA checkpoint (it has a ``wina`` block, of this format version unless
    ``check_version`` is off)."""
    config = read_config_json(directory)
    wina = config.get("wina")
    if not isinstance(wina, dict):
        raise WinaError(f"{directory} is not a WINA checkpoint (config.json has no wina block): run `wina convert` on it first")
    if check_version and wina.get("format_version") not in READABLE_VERSIONS:
        raise WinaError(f"{directory} has WINA format version {wina.get('format_version')!r}; this wina-convert reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    return config


def base_config(config: dict[str, Any]) -> Any:
    """The transformers config of the base architecture behind a WINA config.json."""
    from transformers import AutoConfig

    raw = {k: v for k, v in config.items() if k != "wina"}
    wina = config.get("wina", {})
    if raw.get("model_type") == WINA_MODEL_TYPE:
        raw["model_type"] = wina["base_model_type"]
        raw["architectures"] = wina.get("base_architectures")
    raw.pop("auto_map", None)
    with quiet_transformers():
        return AutoConfig.for_model(**raw)


# --------------------------------------------------------------------------- the record


@dataclass
class WinaRecord:
    """What a checkpoint is and how its gates read: config.json's ``wina`` block and the sidecar's metadata.

    One record, written once in both places (config.json for tools that read no tensors, the sidecar beside
    the tables it describes). docs/format.md documents each field; ``budget.py`` turns the budget
    fields into every level the runtime, ``wina inspect``, the searches and the model card use.
    """

    # how the checkpoint was made
    method: str = "wina"  # the gate's score: "wina" |x_i| ||W[:, i]||, or "teal" |x_i|
    transform: bool = False  # weights rotated into column-orthogonal bases, with shortcut rotations
    basis: str = "svd"  # the transform's bases (svd, pca, pooled)
    center: str = "none"  # the gate reads x - c (mean, median) or x (none)
    head_bases: str = "none"  # per-head value/output bases (pca) or none
    lowrank: dict[str, int] = field(default_factory=dict)  # gated linear -> rank of its compensating factors
    base_model: dict[str, Any] = field(default_factory=dict)  # id, revision, sha256 of what was converted
    base_model_type: str | None = None
    base_architectures: list[str] | None = None
    license: str | None = None
    tool_version: str = __version__
    sidecar: str = SIDECAR
    # the gates and the budget
    num_layers: int = 0
    target_sparsity: float = 0.0  # the fraction of the gated decode bytes the checkpoint is calibrated to skip
    budget: str = "bytes"  # sparsity counts bytes ("params": version-1 checkpoints without it)
    extra_fraction: list[float] = field(default_factory=list)  # per layer: bytes read densely beside the gated matrices
    quantile_levels: list[float] | None = None  # the levels of the sidecar's score quantile tables
    allocation_levels: list[float] | None = None  # the layer levels of the sidecar's allocation tables
    allocation_scope: str = "layer"  # "model": the allocation is indexed by the model's level (the layer search)
    head: str | None = None  # the gated output head's module, if any
    head_sparsity: float = 0.0  # its fraction of columns skipped at the target
    head_share: float | None = None  # in the budget: the head skips head_share * s at model sparsity s
    head_level_scale: float = 1.0  # in the budget: the layers' level is scaled by this
    calibration: dict[str, Any] | None = None  # how it was calibrated and what the searches chose (a report)
    weights: dict[str, Any] | None = None  # how the gated matrices are stored (weights.WeightFormat; None: float)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the checkpoint") -> "WinaRecord":
        """The record of ``data``; unknown fields or versions are refused in one line."""
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise WinaError(f"{where} has WINA format version {version!r}; this wina-convert reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade wina-convert")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise WinaError(f"{where} has WINA fields this wina-convert does not know ({', '.join(unknown)}): upgrade wina-convert")
        record = cls(**data)
        record.format_version = FORMAT_VERSION
        if version == 1 and "budget" not in data:
            record.budget = "params"
        return record


# --------------------------------------------------------------------------- sidecar

def write_sidecar(path: Path, tensors: dict[str, torch.Tensor], record: WinaRecord) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"wina": json.dumps(record.to_dict())})


def read_sidecar(path: Path) -> tuple[dict[str, torch.Tensor], WinaRecord]:
    if not path.is_file():
        raise WinaError(f"{path.parent} has no WINA sidecar ({SIDECAR}): convert the model with `wina convert` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("wina")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WinaError(f"{path} is not a valid sidecar: {one_line(e)}") from e
    try:
        meta = json.loads(raw or "")
    except json.JSONDecodeError as e:
        raise WinaError(f"{path} has no readable WINA metadata") from e
    return tensors, WinaRecord.from_dict(meta, str(path))


# --------------------------------------------------------------------------- manifest and verifying

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


def manifest_files(directory: Path) -> list[str]:
    """The files the manifest of ``directory`` lists (every file of the checkpoint but the card and the manifest)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return sorted(manifest["files"])


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
