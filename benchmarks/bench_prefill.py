"""Prefill speed: does gating the prompt buy anything? A 512-token prompt, dense vs gated, in our runtime.

    python benchmarks/bench_prefill.py --out DIR [--device cuda|cpu] [--prompt 512] [--sparsities 0.5,0.65]
        [--reps N] [--checkpoint WINA_DIR] [--source HF_DIR] [--layers 32] [--work DIR]

Activation sparsity saves weight bytes; a prompt is one forward over all its positions, a matrix-matrix
product whose weights are read once for all of them, so it is compute bound and skipping weight columns
per position saves no time (each position keeps different columns: the masked product is the dense one,
plus the masking). This measures it. Every configuration runs the same ``[1, prompt]`` forward (KV cache
written, as a prefill does; counters off):

* ``plain transformers``: the source model, untouched (where ``--source`` is given);
* ``runtime dense``: the WINA checkpoint at sparsity 0;
* ``prompt dense @s``: at sparsity ``s`` with ``gate_prefill=False`` (the runtime's default now);
* ``prompt gated @s``: at ``s`` with ``gate_prefill=True`` (every prompt position masked by its gates).

CUDA (default when present): a random-weight Llama with Llama-3-8B's shapes in bf16 (``bench_decode.py``'s
builder), converted on the GPU (greedy allocation, a few calibration windows: speed depends on the sparsity
only). CPU: SmolLM2-135M (``--source ~/.cache/wina-convert/smollm2-hf``; converted with greedy allocation
unless ``--checkpoint`` names a converted one). Median of ``--reps`` timed forwards after a warm-up.
Writes DIR/prefill_<device>.md and .json.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wina_convert import convert, load  # noqa: E402


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` (one warm-up call first); CUDA-synchronized."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def prefill(model: Any, ids: torch.Tensor) -> Callable[[], Any]:
    from transformers import DynamicCache

    def run() -> Any:
        with torch.no_grad():
            return model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits[:, -1]

    return run


def measure(label: str, model: Any, ids: torch.Tensor, reps: int) -> dict[str, Any]:
    control = getattr(model, "wina", None)
    if control is not None:
        control.set_counting(False)
    times = timed(prefill(model, ids), reps, ids.device)
    median = statistics.median(times)
    row = {"label": label, "median_s": median, "min_s": min(times), "max_s": max(times), "reps": reps,
           "prompt_tokens_per_s": ids.shape[1] / median}
    print(json.dumps(row), flush=True)
    return row


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--sparsities", default="0.5,0.65")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards per configuration (default: 20 CUDA, 5 CPU)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a converted WINA checkpoint to measure (skips converting)")
    ap.add_argument("--source", type=Path, default=None,
                    help="the Hugging Face model (CPU default ~/.cache/wina-convert/smollm2-hf; CUDA default: a random "
                         "Llama-3-8B-shaped one built here)")
    ap.add_argument("--layers", type=int, default=32, help="CUDA random model: decoder layers")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wina-bench-prefill"))
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"device": str(device), "prompt": args.prompt, "reps": reps,
                            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                            "threads": torch.get_num_threads(), "command": "python benchmarks/bench_prefill.py " + " ".join(sys.argv[1:])}
    source = args.source
    built = False
    if source is None and device.type == "cuda" and args.checkpoint is None:
        from bench_decode import LLAMA3_8B, build_model

        source = args.work / "llama3-8b-shapes"
        shutil.rmtree(source, ignore_errors=True)
        meta["build_s"] = build_model(source, args.layers, LLAMA3_8B, args.device)
        meta["model"] = f"random Llama-3-8B shapes, {args.layers} layers, bf16"
        built = True
    elif source is None and args.checkpoint is None:
        source = Path.home() / ".cache" / "wina-convert" / "smollm2-hf"
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.work / "wina"
        shutil.rmtree(checkpoint, ignore_errors=True)
        t0 = time.perf_counter()
        convert(source, checkpoint, sparsity=0.5, device=args.device, allocation="greedy", head_sparsity=0.0,
                samples=8 if built else None, seq_len=256 if built else None, quiet=True)
        meta["convert_s"] = time.perf_counter() - t0
    meta.setdefault("model", str(source or checkpoint))
    meta["checkpoint"] = str(checkpoint)
    generator = torch.Generator().manual_seed(0)
    rows = []
    if source is not None and not built:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(source, dtype="auto").to(device).eval()
        ids = torch.randint(0, plain.config.vocab_size, (1, args.prompt), generator=generator).to(device)
        rows.append(measure("plain transformers", plain, ids, reps))
        del plain
        free()
    model = load(checkpoint, sparsity=0, device=args.device)
    meta["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta["kernels"] = any(g.kernel is not None for g in model.wina.gates.values())
    ids = torch.randint(0, min(model.config.vocab_size, 4096), (1, args.prompt), generator=generator).to(device)
    rows.append(measure("runtime dense (sparsity 0)", model, ids, reps))
    for s in sparsities:
        model.wina.set_sparsity(s)
        model.wina.set_gate_prefill(False)
        rows.append(measure(f"prompt dense @{s} (gate_prefill=False, the default)", model, ids, reps))
        model.wina.set_gate_prefill(True)
        rows.append(measure(f"prompt gated @{s} (gate_prefill=True)", model, ids, reps))
        # the gated prompt's achieved sparsity (counted once, apart from the timing)
        model.wina.set_counting(True)
        model.wina.reset_stats()
        prefill(model, ids)()
        rows[-1]["achieved_sparsity"] = model.wina.stats()["sparsity"]
    if built:
        shutil.rmtree(source, ignore_errors=True)
    dense = next(r for r in rows if r["label"].startswith("runtime dense"))
    for row in rows:
        row["speedup_vs_runtime_dense"] = dense["median_s"] / row["median_s"]
    report = {**meta, "rows": rows}
    name = f"prefill_{device.type}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Prefill of a {args.prompt}-token prompt (one forward, KV cache written, batch 1): {meta['model']}, "
             f"{meta['dtype']}, {meta['device']}" + (f" ({meta['gpu']})" if meta["gpu"] else f", {meta['threads']} threads")
             + f"; kernels bound: {meta['kernels']}. Median of {reps} forwards after a warm-up.", "",
             "| configuration | median ms | prompt tokens/s | vs runtime dense | achieved sparsity |", "|---|---|---|---|---|"]
    for row in rows:
        achieved = "" if row.get("achieved_sparsity") is None else f"{row['achieved_sparsity']:.3f}"
        lines.append(f"| {row['label']} | {1e3 * row['median_s']:.1f} | {row['prompt_tokens_per_s']:.0f} | "
                     f"{row['speedup_vs_runtime_dense']:.2f}x | {achieved} |")
    lines += ["", f"Command: `{meta['command']}`."]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
