"""How exact ``--basis pca`` and ``--basis pooled`` are on the real SmolLM2 at sparsity 0 (float32, CPU).

Like ``benchmarks/exactness.py`` for the default bases: convert with ``--transform --basis B`` (a small
calibration, 2 x 64 tokens, uniform allocation: the bases need calibration activations, the
sparsity-0 model does not depend on how good they are), load at sparsity 0, and compare the logits of
256 held-out tokens with the original model's: ``||l' - l|| / ||l||``.

    python benchmarks/basis_exactness.py [--smollm2 DIR] [--out benchmarks/results/cpu/basis/exactness.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from exactness import logit_error  # noqa: E402


def relative_error(model_dir: Path, out: Path, basis: str, tokens: int = 256) -> float:
    from wina_convert import convert

    converted = convert(model_dir, out, sparsity=0.5, transform=True, basis=basis, allocation="uniform",
                        samples=2, seq_len=64, quiet=True).output
    return logit_error(model_dir, converted, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", default=os.path.expanduser(os.environ.get("WINA_CACHE", "~/.cache/wina-convert")) + "/smollm2-hf")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "basis" / "exactness.txt"))
    args = ap.parse_args()
    lines = [f"# python benchmarks/basis_exactness.py  (torch {torch.__version__}, {platform.machine()}, float32, CPU)",
             "# SmolLM2-135M-Instruct, 256 held-out tokens: relative logit error ||l' - l|| / ||l|| at sparsity 0"]
    with tempfile.TemporaryDirectory() as tmp:
        for basis in ("svd", "pca", "pooled"):
            error = relative_error(Path(args.smollm2), Path(tmp) / basis, basis)
            lines.append(f"--basis {basis:<8} {error:.2e}")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
