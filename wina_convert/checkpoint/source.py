"""Reading the model to convert, one tensor at a time: a local safetensors directory, a .gguf file, a Hub id.

A converter that walks the layers holds one layer at a time, never the whole model (GGUF aside:
transformers dequantizes it whole).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import WinaError, one_line
from .format import DTYPES, INDEX, SIDECAR, WINA_MODEL_TYPE, read_config_json, sha256_file


def weights_sha256(files: list[Path]) -> str:
    """Identity of local weights: sha256 of the sorted ``name sha256(file)`` lines of its files."""
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in sorted(set(files), key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


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
            raise WinaError(f"{path} is not a valid safetensors file: {one_line(e)} (corrupt or truncated?)") from e
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
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> its safetensors file (a directory)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # or the tensors themselves (a dequantized .gguf)
    origin: list[Path] = field(default_factory=list)  # the directory or .gguf file it was read from
    _handles: dict[Path, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors) if self.tensors else list(self.files)

    def has(self, name: str) -> bool:
        return name in self.tensors or name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh copy of tensor ``name``, owned by the caller (who may modify it in place)."""
        if name in self.tensors:
            return self.tensors[name].clone()
        if name not in self.files:
            raise WinaError(f"the checkpoint has no tensor {name!r}: config and weights do not match")
        path = self.files[name]
        try:
            return self._file(path).read(name)
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            raise WinaError(f"cannot read {name!r} from {path.name}: {one_line(e)} (corrupt or truncated file?)") from e

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    def numel(self, name: str) -> int:
        """Elements of a tensor, from the file's header (nothing is read)."""
        if name in self.tensors:
            return self.tensors[name].numel()
        return math.prod(self._file(self.files[name]).entries[name]["shape"])

    def dtype_of(self, name: str) -> torch.dtype | None:
        """The stored dtype of a tensor, from the file's header (nothing is read)."""
        if name in self.tensors:
            return self.tensors[name].dtype
        return self._file(self.files[name]).dtype(name) if name in self.files else None

    @property
    def dtype(self) -> torch.dtype:
        for name in self.names:
            if name.endswith("embed_tokens.weight"):
                return self.dtype_of(name) or torch.float32
        return torch.float32


def read_model_config(directory: Path) -> Any:
    """The transformers config of a model to convert; refuses WINA checkpoints, quantized models and
    unsupported families.

    A model's own code (``auto_map``) is never run: the supported families are all in transformers.
    """
    from transformers import AutoConfig

    path = directory / "config.json"
    raw = read_config_json(directory, "a Hugging Face model directory")
    if raw.get("model_type") == WINA_MODEL_TYPE or "wina" in raw:
        raise WinaError(f"{directory} is already a WINA checkpoint (made by wina-convert); convert the base model instead")
    from ..arch import adapter_for

    adapter_for(raw.get("model_type", "<missing model_type>"))
    refuse_quantized_config(raw, path)
    raw.pop("auto_map", None)
    try:
        return AutoConfig.for_model(**raw)
    except Exception as e:  # transformers raises many types for bad configs
        raise WinaError(f"cannot read {path}: {one_line(e)}") from e


# Float dtypes a converter can read as they are; anything else in a weight file is a quantized pack.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Non-float dtypes that hold buffers, never weights (position ids, masks).
BUFFER_DTYPES = ("I64", "BOOL")


def refuse_quantized_config(raw: dict[str, Any], path: Path) -> None:
    """A config with ``quantization_config`` (fp8, compressed-tensors, GPTQ, AWQ, bitsandbytes, ...)
    describes weights that are packed integers or 8-bit floats plus scales: reading them as floats
    without their scales would silently give another model."""
    quant = raw.get("quantization_config")
    if quant is None:
        return
    scheme = "unknown scheme"
    if isinstance(quant, dict):
        scheme = str(quant.get("quant_method") or quant.get("format") or
                     ("bitsandbytes" if any(k.startswith(("load_in_", "bnb_")) for k in quant) else scheme))
    raise WinaError(f"{path.parent} is a quantized model ({scheme}, config.json quantization_config): "
                    "wina-convert needs float weights; dequantize it first (load it with transformers and "
                    "save_pretrained in bfloat16), or convert a .gguf file")


def refuse_quantized_weights(source: "Source", directory: Path) -> None:
    """Refuse weight files holding non-float tensors (F8_E4M3/E5M2, I8, U8, I32 packs, ...)."""
    for name, path in source.files.items():
        dtype = source._file(path).entries[name].get("dtype")
        if dtype not in FLOAT_DTYPES and dtype not in BUFFER_DTYPES:
            raise WinaError(f"{directory}: tensor {name!r} in {path.name} is stored as {dtype} (quantized weights): "
                            "wina-convert needs float weights; dequantize the model first")


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WinaError(f"{index} is not a valid safetensors index: {one_line(e)}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise WinaError(f"{index} is not a valid safetensors index: weight_map must map tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise WinaError(f"{index} is not a valid safetensors index: tensor {name!r} maps to {shard!r}, not a shard file name")
    return weight_map


def safetensors_files(directory: Path) -> dict[str, Path]:
    index = directory / INDEX
    files: dict[str, Path] = {}
    if index.is_file():
        weight_map = read_index(index)
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
            raise WinaError(f"{shard} is not a valid safetensors file: {one_line(e)} (corrupt or truncated?)") from e
    return files


def open_directory(directory: Path, *, model_id: str | None = None, revision: str | None = None,
                   quantized: Callable[..., Source | None] | None = None) -> Source:
    """A local Hugging Face directory (safetensors, sharded or not); ``quantized`` (``convert --weights``:
    ``quantized_source.open_if_compressed``) opens a directory it takes as is, its packed values kept."""
    from transformers import GenerationConfig

    if quantized is not None:
        kept = quantized(directory, model_id=model_id, revision=revision)
        if kept is not None:
            return kept

    config = read_model_config(directory)
    files = safetensors_files(directory)
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        generation = None
    base = {"id": model_id or directory.name, "revision": revision, "sha256": None}
    source = Source(config=config, base=base, tokenizer_source=directory, generation_config=generation, files=files,
                    origin=[directory])
    for path in set(files.values()):
        source._file(path)  # every header read now: a truncated shard fails before any work
    refuse_quantized_weights(source, directory)
    return source


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
        raise WinaError(f"reading .gguf files needs extra packages: {one_line(e)}") from e
    except Exception as e:  # gguf/transformers raise many types for bad files
        raise WinaError(f"cannot read {path}: {one_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    from ..arch import adapter_for

    adapter_for(model.config.model_type)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    generation = model.generation_config
    base = {"id": path.name, "revision": None, "sha256": sha256_file(path)}
    return Source(config=config, base=base, tokenizer_source=tokenizer, generation_config=generation, tensors=tensors,
                  origin=[path])


def open_source(model: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                quantized: Callable[..., Source | None] | None = None) -> Source:
    """A Hub id, a local Hugging Face directory or a .gguf file."""
    path = Path(os.path.expanduser(str(model)))
    if revision is not None and (path.exists() or path.suffix == ".gguf"):
        # a local input has no revision: recording one would stand in for the sha256 of its weights
        raise WinaError(f"--revision applies to Hub ids only, and {model} is a local path: drop --revision")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WinaError(f"no such file: {model}")
        return open_gguf(path)
    if path.is_dir():
        return open_directory(path, quantized=quantized)
    if path.exists():
        raise WinaError(f"{model} is neither a model directory nor a .gguf file")
    from ..hub.download import hub_revision, resolve_model

    local = resolve_model(str(model), revision=revision, token=token, purpose="convert")
    if local.is_file():
        return open_gguf(local)
    return open_directory(local, model_id=str(model), revision=hub_revision(local) or revision, quantized=quantized)
