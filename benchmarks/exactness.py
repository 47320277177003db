"""How exact the transform is at sparsity 0: relative logit error against the original model, float32.

The measurement of ``tests/test_transform.py`` (the same models, the same token windows), written down:
each tiny random model of every supported family (3 layers, ``tests/helpers.py``'s recipe, random norm
weights so that folding them is exercised) on 96 held-out tokens, and the real SmolLM2-135M-Instruct
(float32, dequantized from its Q4_1 GGUF) on 256. The error is ``||l' - l|| / ||l||`` over all positions'
logits ``l`` (original) and ``l'`` (converted with ``--transform``, loaded at sparsity 0). Without the
transform the weights are copied and the error is 0 exactly (also in the output).

    python benchmarks/exactness.py [--smollm2 DIR] [--out benchmarks/results/exactness.txt]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _helpers():
    """``tests/helpers.py`` (the tiny models' recipe and tokenizer), loaded from its file: the tests are not installed."""
    spec = importlib.util.spec_from_file_location("wina_tests_helpers", ROOT / "tests" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids(directory: Path, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    text = (ROOT / "wina_convert" / "calibration" / "data" / "heldout" / "heldout.txt").read_text(encoding="utf-8")
    return torch.tensor([tok(text)["input_ids"][:tokens]])


def logit_error(model_dir: Path, converted: Path, tokens: int) -> float:
    """``||l' - l|| / ||l||`` of ``converted`` loaded at sparsity 0 against the original ``model_dir``, on
    ``tokens`` held-out tokens (float64 logits)."""
    from transformers import AutoModelForCausalLM

    from wina_convert import load

    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load(converted, sparsity=0)
    ids = _ids(model_dir, tokens)
    with torch.no_grad():
        a, b = original(ids).logits.double(), model(ids).logits.double()
    return float((a - b).norm() / a.norm())


def relative_error(model_dir: Path, work: Path, tokens: int, transform: bool) -> float:
    from wina_convert import convert

    out = convert(model_dir, work / f"{model_dir.name}-{transform}", calibrate=False, transform=transform, quiet=True).output
    return logit_error(model_dir, out, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", default=os.path.expanduser(os.environ.get("WINA_CACHE", "~/.cache/wina-convert")) + "/smollm2-hf")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "exactness.txt"))
    args = ap.parse_args()
    helpers = _helpers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = helpers.save_tiny_tokenizer(root / "tiny-tokenizer")
        for family in helpers.FAMILIES:
            model_dir = helpers.build_tiny(family, root / family, tok)
            rows.append((f"tiny {family}", 96, relative_error(model_dir, root, 96, True), relative_error(model_dir, root, 96, False)))
        smollm2 = Path(args.smollm2)
        if smollm2.is_dir():
            rows.append(("SmolLM2-135M-Instruct", 256, relative_error(smollm2, root, 256, True), relative_error(smollm2, root, 256, False)))
    lines = [f"# python benchmarks/exactness.py  (torch {torch.__version__}, {platform.machine()}, float32, CPU)",
             "# relative logit error ||l' - l|| / ||l|| at sparsity 0 against the original model",
             f"{'model':<24} {'tokens':>6} {'--transform':>12} {'--no-transform':>15}"]
    lines += [f"{name:<24} {n:>6} {t:>12.2e} {p:>15.2e}" for name, n, t, p in rows]
    lines.append(f"max with --transform: {max(r[2] for r in rows):.2e}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
