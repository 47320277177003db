"""Where a decode step's GPU time goes: torch.profiler over CUDA-graph replays of the compiled step.

    python benchmarks/profile_decode.py --out DIR [--layers 8] [--sparsities 0,0.5] [--steps 16]

Builds the random Llama-3-8B-shaped model of ``bench_decode.py`` (``--layers`` of them; the lm_head and
embedding are the real size), converts it without the transform at 0.5, records the compiled decode step
at each sparsity and profiles ``--steps`` steps. Prints and writes (DIR/profile_decode.txt, .json) the
GPU time per step by kernel class: gated GEMVs, attention, lm_head, argmax and the rest (norms, rotary,
cache writes, residual adds), with each class's share, and what the step would take at the byte limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA3_8B, build_model, free  # noqa: E402

from wina_convert import convert, load  # noqa: E402
from wina_convert.runtime.graphs import greedy  # noqa: E402


def classify(name: str) -> str:
    n = name.lower()
    if "gemv_kernel" in n or "gemm_kernel" in n:
        return "gated GEMV"
    if "attention" in n or "attn" in n or "flash" in n or "sdpa" in n or "fmha" in n:
        return "attention"
    if "gemv" in n or "gemm" in n or "sm90_xmma" in n or "cublas" in n or "cutlass" in n or "nvjet" in n:
        return "cuBLAS (lm_head)"
    if "argmax" in n or "max" in n and "reduce" in n:
        return "argmax/reduce"
    if n.startswith("triton_"):
        return "inductor fused"
    return "other"


def profile(model, prompt, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    greedy(model, prompt, 6)  # graphs recorded, kernels compiled
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        greedy(model, prompt, steps + 1)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(evt.name, []).append(evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total)
    per_class: dict[str, float] = {}
    top = []
    for name, times in kernels.items():
        total = sum(times) / steps  # us per step (the prompt's forward adds a little)
        per_class[classify(name)] = per_class.get(classify(name), 0.0) + total
        top.append((total, len(times) / steps, re.sub(r"\s+", " ", name)[:110]))
    top.sort(reverse=True)
    return {"per_class_us": per_class, "step_us": sum(per_class.values()), "top": top[:25]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/wina-profile")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    work = Path(args.work)
    src, ckpt = work / "src", work / "ckpt"
    if not (ckpt / "config.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        build_model(src, args.layers, LLAMA3_8B, "cuda")
        convert(src, ckpt, sparsity=0.5, transform=False, device="cuda", samples=8, seq_len=256, quiet=True,
                allocation="greedy")
        shutil.rmtree(src, ignore_errors=True)
        free()
    model = load(ckpt, sparsity=0.0, device="cuda")
    model.wina.set_counting(False)
    runner = model.wina_decode
    runner.compile = True
    prompt = torch.randint(0, 4096, (1, 32), device="cuda")
    lines, result = [], {"layers": args.layers, "gpu": torch.cuda.get_device_name(0), "runs": {}}
    for s in [float(v) for v in args.sparsities.split(",")]:
        from wina_convert.runtime.kernels.hook import force_kernels
        model.wina.set_sparsity(s)
        if s == 0:
            force_kernels(model.wina)
        res = profile(model, prompt, args.steps)
        result["runs"][str(s)] = res
        lines.append(f"== sparsity {s}: {res['step_us']:.0f} us of GPU time per step ({args.layers} layers) ==")
        for cls, us in sorted(res["per_class_us"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {cls:18s} {us:8.1f} us  {us / res['step_us']:5.1%}  ({us / args.layers:.1f} us per layer)")
        lines.append("  top kernels (us per step, launches per step, name):")
        for total, count, name in res["top"]:
            lines.append(f"    {total:8.1f} {count:5.1f}  {name}")
    text = "\n".join(lines)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_decode.txt").write_text(text + "\n")
    (out / "profile_decode.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
