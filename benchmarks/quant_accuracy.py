"""Sparsity on quantized weights: float, int8 and int4 gated matrices, dense and gated, on held-out text.

    python benchmarks/quant_accuracy.py MODEL --out DIR [--weights float,int8,int4] [--target 0.5]
        [--sparsities 0.4,0.5,0.65] [--group-size 64] [--tasks piqa,arc_easy --limit N] [--max-tokens N]
        [--samples N --seq-len N --allocation A --head-sparsity H] [--work DIR --keep]
    python benchmarks/quant_accuracy.py MODEL --out DIR --render [--merge RUN_DIR ...]

For each weight format: one ``wina_convert.convert`` of MODEL at ``--target`` with convert's defaults (the
layer search, the head in the budget; ``--weights`` for the quantized ones; ``--samples`` etc. override them where
CPU time is short, and the table says so), then ``wina_convert.evaluate`` of
that checkpoint dense (sparsity 0) and at each ``--sparsities`` (the levels other than the target come from the
same checkpoint's tables, without recalibration; the table says which cells are at the target). Per cell: held-out
perplexity (bundled held-out text, never read by calibration), kept-bytes fraction, bytes per token (the gated
matrices as stored, codes, scales and offsets, plus the head and one embedding row) and, with ``--tasks``, the mean
zero-shot accuracy (``--limit`` items per task). The composition check of issue 30:
``(ppl(q @ s) / ppl(q dense)) / (ppl(float @ s) / ppl(float dense))`` per format and sparsity, at most 1.05 wanted.
Writes DIR/quant_accuracy.json (raw) and DIR/quant_accuracy.md; ``--render`` rewrites the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from wina_convert import convert, evaluate


def measure(model: str, fmt: str, args: argparse.Namespace, out: Path, on_cell=None) -> dict[str, Any]:
    """Convert ``model`` with weights ``fmt`` at the target and evaluate it dense and at every sparsity."""
    checkpoint = args.work / f"ckpt-{fmt}"
    start = time.perf_counter()
    if not checkpoint.exists():
        options = {k: v for k, v in (("samples", args.samples), ("seq_len", args.seq_len), ("allocation", args.allocation),
                                     ("head_sparsity", None if args.head_sparsity is None else (args.head_sparsity if args.head_sparsity == "auto" else float(args.head_sparsity)))) if v is not None}
        convert(model, checkpoint, sparsity=args.target, weights=None if fmt == "float" else fmt,
                group_size=None if fmt == "float" else args.group_size, quiet=True, **options)
    row: dict[str, Any] = {"weights": fmt, "convert_seconds": time.perf_counter() - start, "cells": {}}
    from transformers import AutoTokenizer

    from wina_convert import load
    from wina_convert.calibration.text import eval_windows, heldout_texts
    from wina_convert.evaluate.perplexity import _weights, perplexity

    net = load(checkpoint, sparsity=0)
    ctl = net.wina
    texts, _ = heldout_texts(None)
    windows = eval_windows(AutoTokenizer.from_pretrained(checkpoint), texts, 512, args.max_tokens)
    ctl.set_gate_prefill(True)
    dense = None
    for s in [0.0, *args.sparsities]:  # the dense pass once; each sparsity as `wina eval` measures it
        ctl.set_sparsity(s)
        ctl.reset_stats()
        ppl = perplexity(net, windows)
        dense = ppl if dense is None else dense
        stats = ctl.stats()
        head = net.get_output_embeddings().weight
        head_bytes = head.numel() * head.element_size() if stats.get("head") is None else stats["head"]["bytes_per_token"]
        cell = {"perplexity": ppl, "dense_perplexity": dense, "sparsity": stats["sparsity"],
                "kept_bytes_fraction": stats["kept_bytes_fraction"], "weights": _weights(ctl),
                "bytes_per_token": stats["gated_bytes_per_token"] + head_bytes + head.shape[-1] * head.element_size(),
                "tokens": int(windows[:, 1:].numel()), "head_sparsity": None if stats.get("head") is None else stats["head"]["sparsity"]}
        if args.tasks:
            from wina_convert.evaluate.tasks import evaluate_tasks

            scores = evaluate_tasks(net, args.tasks, limit=args.limit, sparsity=s, dense=False)
            cell["tasks"] = scores["sparse"]
        row["cells"][str(s)] = cell
        print(fmt, s, {k: cell[k] for k in ("perplexity", "kept_bytes_fraction", "bytes_per_token")},
              (cell.get("tasks") or {}).get("mean"), flush=True)
        if on_cell is not None:
            on_cell(row)
    row["seconds"] = time.perf_counter() - start
    return row


def render(report: dict[str, Any]) -> str:
    rows = [r for r in report["rows"] if "0.0" in r["cells"]]
    if not rows:
        return "nothing measured yet\n"
    sparsities = ["0.0", *[str(s) for s in report["sparsities"]]]
    floats = next((r for r in rows if r["weights"] == "float"), None)
    options = {k: v for k, v in (report.get("convert") or {}).items() if v is not None}
    settings = ("convert's defaults" if not options else
                "convert's defaults but " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in options.items()))
    lines = [f"Model: `{report['model']}`; checkpoints converted at {report['target']} with {settings} "
             f"(quantized: `--weights int4|int8 --group-size {report['group_size']}`, round to nearest); held-out text "
             f"({rows[0]['cells']['0.0']['tokens']} tokens); other sparsities from the same checkpoint (no recalibration)."
             + (f" Zero-shot: mean accuracy over {report['tasks']}, {report['limit']} items per task." if report.get("tasks") else ""),
             "", "| weights | sparsity | perplexity | ppl / dense | composition vs float | zero-shot mean | kept bytes | bytes per token |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        dense = row["cells"]["0.0"]["perplexity"]
        for s in sparsities:
            cell = row["cells"].get(s)
            if cell is None:
                continue
            ratio = cell["perplexity"] / dense
            composition = ""
            if floats is not None and s in floats["cells"] and float(s) > 0:
                float_ratio = floats["cells"][s]["perplexity"] / floats["cells"]["0.0"]["perplexity"]
                composition = f"{ratio / float_ratio:.3f}"
            acc = ((cell.get("tasks") or {}).get("mean") or {}).get("acc")
            label = "dense" if float(s) == 0 else f"{s}" + (" (target)" if float(s) == report["target"] else "")
            lines.append(f"| {row['weights']} | {label} | {cell['perplexity']:.3f} | {ratio:.3f} | {composition} | "
                         f"{'' if acc is None else f'{100 * acc:.1f}'} | {100 * cell['kept_bytes_fraction']:.1f}% | "
                         f"{cell['bytes_per_token'] / 1e6:.2f} MB |")
    lines += ["", "composition vs float: (ppl(w @ s) / ppl(w dense)) / (ppl(float @ s) / ppl(float dense)); issue 30 asks <= 1.05."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", default="float,int8,int4")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--sparsities", default="0.4,0.5,0.65")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default: convert's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default: convert's)")
    parser.add_argument("--allocation", default=None, help="convert's --allocation (default: convert's)")
    parser.add_argument("--head-sparsity", default=None, help="convert's --head-sparsity (default: convert's)")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: --out)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: removed once measured)")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="with --render: take the rows of these runs' DIR/quant_accuracy.json (one format each, same settings)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out
    path = args.out / "quant_accuracy.json"
    if args.render:
        if args.merge:
            parts = [json.loads((d / "quant_accuracy.json").read_text()) for d in args.merge]
            report = {**parts[0], "rows": [row for part in parts for row in part["rows"]]}
            path.write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "quant_accuracy.md").write_text(render(json.loads(path.read_text())))
        return
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.max_tokens is None:
        from wina_convert.evaluate.perplexity import DEFAULT_EVAL_TOKENS

        args.max_tokens = DEFAULT_EVAL_TOKENS
    report = json.loads(path.read_text()) if path.exists() else {
        "model": args.model, "target": args.target, "sparsities": args.sparsities, "group_size": args.group_size,
        "tasks": args.tasks, "limit": args.limit, "rows": [],
        "convert": {"samples": args.samples, "seq_len": args.seq_len, "allocation": args.allocation,
                    "head_sparsity": args.head_sparsity}}
    for fmt in args.weights.split(","):
        def save(row: dict[str, Any], fmt: str = fmt) -> None:  # after each cell: a long run keeps what it measured
            report["rows"] = [r for r in report["rows"] if r["weights"] != fmt] + [row]
            path.write_text(json.dumps(report, indent=1) + "\n")
            (args.out / "quant_accuracy.md").write_text(render(report))

        save(measure(args.model, fmt, args, args.out, save))
        if not args.keep:
            shutil.rmtree(args.work / f"ckpt-{fmt}", ignore_errors=True)
    print(render(report))


if __name__ == "__main__":
    main()
