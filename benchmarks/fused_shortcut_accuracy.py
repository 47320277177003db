"""How far the fused shortcut path is from float32, next to the masking reference (CPU, torch path).

    python benchmarks/fused_shortcut_accuracy.py [MODEL] [--out DIR] [--work DIR]

A transformed checkpoint computes its shortcut rotations at decode time inside the q/k/v and gate/up
launches, from the normalized input rounded to bf16 and scaled back by rms(h) (``runtime/kernels/hook.py``, ``fuse_shortcuts``),
where the reference multiplies the residual itself. This script converts MODEL (default: the SmolLM2-135M
built by scripts/fetch_models.py) with the transform at 0.5 in bf16, then teacher-forces 16 decode steps of
a fixed random prompt and compares the logits of bf16 (a) reference, (b) kernel hooks, (c) kernel hooks with
the shortcuts fused, with float32 on the same checkpoint, at sparsity 0 and 0.5. On the CPU the hooks
compute with torch (``kernels.gated_linear``'s fallback), so this measures the arithmetic, not the kernels.
Writes DIR/fused_shortcut_accuracy.txt.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import torch

from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.runtime.kernels.hook import bind_kernels, force_kernels, fuse_shortcuts, input_groups

ROOT = Path(__file__).resolve().parent.parent


def logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    with torch.no_grad():
        model(input_ids=ids[:, :-steps], past_key_values=cache, use_cache=True)
        out = [model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
               for t in range(ids.shape[1] - steps, ids.shape[1])]
    return torch.cat(out)


def variant(path: Path, sparsity: float, dtype, hooks: bool, fused: bool):
    model = load(path, sparsity=sparsity, dtype=dtype)
    if sparsity == 0:
        force_kernels(model.wina)
    adapter = adapter_for(model.config.model_type)
    if hooks:
        bind_kernels(model.wina, input_groups(adapter, model.config.num_hidden_layers))
        if fused and fuse_shortcuts(model.get_submodule(adapter.layers_prefix), adapter) != model.config.num_hidden_layers:
            raise SystemExit("not every layer was fused")
    for gate in model.wina.gates.values():
        gate.counting = False
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default="/tmp/wina-fused-accuracy")
    args = ap.parse_args()
    if args.model is None:
        fetch = runpy.run_path(str(ROOT / "scripts" / "fetch_models.py"))  # a script, not a module of the package
        args.model = fetch["build_hf_dir"](fetch["fetch_gguf"]("smollm2"), fetch["DEFAULT_CACHE"] / "smollm2-hf")
    path = Path(args.work) / "transform-bf16"
    if not (path / "config.json").exists():
        convert(args.model, path, sparsity=0.5, transform=True, dtype="bfloat16", quiet=True, samples=8, seq_len=256,
                overwrite=True)
    ids = torch.randint(100, 40000, (1, 40), generator=torch.Generator().manual_seed(0))
    lines = [f"# {Path(__file__).name}: {args.model}, transform, bf16, 16 teacher-forced decode steps; "
             "error = ||logits - float32|| / ||float32||, top-1 = agreement with float32's argmax",
             "sparsity  path                      rel. error  top-1"]
    for sparsity in (0.0, 0.5):
        truth = logits(variant(path, sparsity, torch.float32, False, False), ids, 16)
        for name, hooks, fused in (("reference (masking)", False, False), ("kernel hooks", True, False),
                                   ("kernel hooks + fused shortcuts", True, True)):
            got = logits(variant(path, sparsity, torch.bfloat16, hooks, fused), ids, 16)
            err = float((got - truth).norm() / truth.norm())
            top1 = float((got.argmax(-1) == truth.argmax(-1)).float().mean())
            lines.append(f"{sparsity:<9} {name:<31} {err:.4f}  {top1:.3f}")
            print(lines[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fused_shortcut_accuracy.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
