"""Accuracy as deployed (prompts dense, generated tokens sparse) against the papers' protocol (every token gated).

    python benchmarks/deployed_table.py MODEL --out DIR [--settings default,teal] [--calibrate-at 0.5]
        [--sparsities 0.4,0.5,0.65] [--max-tokens N] [--tasks piqa,... --limit N] [--gsm8k-limit N]
        [--protocols deployed,all-tokens] [--work DIR] [--device cpu] [--render]

One checkpoint per setting (``accuracy_table.py``'s settings: ``default`` is every default of ``wina convert``,
``teal`` is TEAL's recipe: ``--method teal --allocation greedy``, dense output head), converted once at
``--calibrate-at`` (or at each sparsity with ``--calibrate-at each``) and kept in ``--work`` (a rerun reuses it:
the protocol is an evaluation-time setting). Each checkpoint is evaluated at every sparsity under every
protocol: held-out perplexity (dense and sparse on the same scored tokens) and, with ``--tasks``, zero-shot
accuracy with its standard error, and with ``--gsm8k-limit`` GSM8K (greedy generation, lm-eval's stock config).
Writes DIR/deployed.json (after every cell) and DIR/deployed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_table import SETTINGS, options  # noqa: E402

from wina_convert import convert, evaluate, load  # noqa: E402

PROTOCOLS = ("deployed", "all-tokens")


def checkpoint(model: str, setting: str, sparsity: float, work: Path, device: str,
               samples: int | None = None) -> tuple[Path, float | None]:
    """The converted checkpoint of ``setting`` at ``sparsity`` in ``work`` (converted now if missing), and the
    seconds the conversion took (None: reused)."""
    target = work / f"{Path(model).name}-{setting}-{sparsity}" if samples is None else work / f"{Path(model).name}-{setting}-{sparsity}-{samples}x512"
    if (target / "wina.safetensors").is_file():
        return target, None
    t0 = time.perf_counter()
    convert(model, target, sparsity=sparsity, device=device, quiet=True, samples=samples, **options(SETTINGS[setting]))
    return target, time.perf_counter() - t0


def task_scores(net: Any, tasks: list[str], limit: int | None, sparsity: float, protocol: str, device: str,
                dense: bool) -> dict[str, Any]:
    from wina_convert.evaluate.tasks import evaluate_tasks

    out = evaluate_tasks(net, tasks, limit=limit, sparsity=sparsity, device=device, protocol=protocol, dense=dense)
    return {"dense": out["dense"], "sparse": out["sparse"], "sparsity": out["sparsity"], "seconds": out["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--settings", default="default,teal")
    parser.add_argument("--calibrate-at", default="0.5", help="the sparsity each checkpoint is converted at, or 'each'")
    parser.add_argument("--sparsities", default="0.4,0.5,0.65")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--gsm8k-limit", type=int, default=None, help="also GSM8K (greedy generation), this many items")
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows of 512 tokens (default: convert's, 16)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wina-deployed-table"))
    parser.add_argument("--render", action="store_true", help="only render DIR/deployed.md from DIR/deployed.json")
    args = parser.parse_args()
    path = args.out / "deployed.json"
    if args.render:
        report = json.loads(path.read_text())
        (args.out / "deployed.md").write_text(markdown(report))
        print(markdown(report))
        return
    if args.model is None:
        parser.error("MODEL is required (except with --render)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.is_file() else {"model": args.model, "cells": [], "commands": []}
    report["commands"].append("python benchmarks/deployed_table.py " + " ".join(sys.argv[1:]))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    protocols = args.protocols.split(",")
    tasks = args.tasks.split(",") if args.tasks else []
    dense_done: set[tuple[str, str]] = {(c["protocol"], c["kind"]) for c in report["cells"] if c.get("dense") is not None}

    def save(cell: dict[str, Any]) -> None:
        report["cells"] = [c for c in report["cells"] if not all(c.get(k) == cell[k] for k in ("setting", "sparsity", "protocol", "kind"))]
        report["cells"].append(cell)
        path.write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "deployed.md").write_text(markdown(report))
        print(json.dumps({k: cell[k] for k in ("setting", "sparsity", "protocol", "kind")} | cell.get("summary", {})), flush=True)

    dense_ppl: dict[str, float] = {c["protocol"]: c["dense"] for c in report["cells"] if c["kind"] == "perplexity"}
    for sparsity in sparsities:  # every setting at the first sparsity first: a run stopped early has comparisons
        for setting in args.settings.split(","):
            at = sparsity if args.calibrate_at == "each" else float(args.calibrate_at)
            directory, convert_s = checkpoint(args.model, setting, at, args.work, args.device, args.samples)
            net = load(directory, sparsity=0, device=args.device)
            base = {"setting": setting, "sparsity": sparsity, "calibrated_at": at, "checkpoint": str(directory), "samples": args.samples,
                    "convert_s": convert_s}
            for protocol in protocols:
                if not args.no_perplexity:
                    t0 = time.perf_counter()
                    # the dense model is the same for every setting (no transform among them): measured once
                    ev = evaluate(net, sparsity=sparsity, max_tokens=args.max_tokens, seq_len=args.seq_len, protocol=protocol,
                                  device=args.device, dense_perplexity=dense_ppl.get(protocol))
                    dense_ppl[protocol] = ev["dense_perplexity"]
                    save({**base, "protocol": protocol, "kind": "perplexity", "dense": ev["dense_perplexity"],
                          "sparse": ev["perplexity"], "achieved": ev["sparsity"], "kept_bytes_fraction": ev["kept_bytes_fraction"],
                          "tokens": ev["tokens"], "prompt_tokens": ev["prompt_tokens"], "text": ev["text"],
                          "seconds": time.perf_counter() - t0,
                          "summary": {"dense": round(ev["dense_perplexity"], 3), "sparse": round(ev["perplexity"], 3)}})
                if tasks:
                    with_dense = (protocol, "tasks") not in dense_done
                    scores = task_scores(net, tasks, args.limit, sparsity, protocol, args.device, with_dense)
                    if with_dense:
                        report.setdefault("dense_tasks", {})[protocol] = scores["dense"]
                        dense_done.add((protocol, "tasks"))
                    save({**base, "protocol": protocol, "kind": "tasks", "limit": args.limit, "dense": scores["dense"],
                          "sparse": scores["sparse"], "achieved": scores["sparsity"], "seconds": scores["seconds"],
                          "summary": {"mean": scores["sparse"]["mean"]["acc"]}})
                if args.gsm8k_limit:
                    with_dense = (protocol, "gsm8k") not in dense_done
                    scores = task_scores(net, ["gsm8k_cot"], args.gsm8k_limit, sparsity, protocol, args.device, with_dense)
                    if with_dense:
                        report.setdefault("dense_gsm8k", {})[protocol] = scores["dense"]
                        dense_done.add((protocol, "gsm8k"))
                    save({**base, "protocol": protocol, "kind": "gsm8k", "limit": args.gsm8k_limit, "dense": scores["dense"],
                          "sparse": scores["sparse"], "achieved": scores["sparsity"], "seconds": scores["seconds"],
                          "summary": {"gsm8k": scores["sparse"]["gsm8k_cot"]["acc"]}})
            del net
    print(markdown(report))


def _pct(v: Any, se: Any = None) -> str:
    if v is None:
        return ""
    return f"{100 * v:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def _mean_se(scores: dict[str, Any], tasks: list[str]) -> float | None:
    errors = [(scores.get(t) or {}).get("acc_stderr") for t in tasks]
    return None if not errors or None in errors else sum(e * e for e in errors) ** 0.5 / len(errors)


def markdown(report: dict[str, Any]) -> str:
    cells = report["cells"]
    lines = [f"Model: `{report['model']}`."]
    ppl = [c for c in cells if c["kind"] == "perplexity"]
    if ppl:
        first = ppl[0]
        lines += ["", f"Held-out perplexity ({first['text']}; `deployed`: windows of {2 * (first['prompt_tokens'] or 0) or '?'} "
                  "tokens, the first half a dense prompt, the second half gated and scored; `all-tokens`: every token gated "
                  "and scored). Each cell: sparse perplexity (dense on the same tokens) / gap to dense / achieved sparsity "
                  "of the scored tokens. Gap ratio: the default's gap over TEAL's.", "",
                  "| protocol | sparsity | default | TEAL (greedy, dense head) | gap ratio |", "|---|---|---|---|---|"]
        for protocol in PROTOCOLS:
            for s in sorted({c["sparsity"] for c in ppl}):
                row = {c["setting"]: c for c in ppl if c["protocol"] == protocol and c["sparsity"] == s}
                if not row:
                    continue
                text = {k: f"{c['sparse']:.2f} ({c['dense']:.2f}) / +{c['sparse'] - c['dense']:.2f} / {c['achieved']:.3f}"
                        + ("" if c["calibrated_at"] == s else f" (from {c['calibrated_at']})") for k, c in row.items()}
                ratio = ""
                if "default" in row and "teal" in row:
                    gd, gt = row["default"]["sparse"] - row["default"]["dense"], row["teal"]["sparse"] - row["teal"]["dense"]
                    ratio = f"{gd / gt:.2f}" if gt > 0 else ""
                lines.append(f"| {protocol} | {s} | {text.get('default', '')} | {text.get('teal', '')} | {ratio} |")
    for kind, title in (("tasks", "Zero-shot accuracy"), ("gsm8k", "GSM8K (greedy, lm-eval's stock config)")):
        rows = [c for c in cells if c["kind"] == kind]
        if not rows:
            continue
        tasks = [t for t in rows[0]["sparse"] if t != "mean"]
        limit = rows[0].get("limit")
        lines += ["", f"{title}: `acc` in % ± its standard error (lm-eval's), the first {limit} items per task"
                  + (" (MMLU: per subject)" if "mmlu" in tasks else "") + "; mean: unweighted over tasks, its standard error "
                  "from the tasks' (independent). Drop: dense minus sparse under the same protocol.", "",
                  "| protocol | model | " + " | ".join(tasks) + (" | mean | drop |" if kind == "tasks" else " | drop |"),
                  "|---|---|" + "---|" * (len(tasks) + (2 if kind == "tasks" else 1))]
        for protocol in PROTOCOLS:
            dense = report.get(f"dense_{kind}" if kind == "gsm8k" else "dense_tasks", {}).get(protocol)
            if dense is None:
                continue
            entries = [("dense", dense)] + [(f"{c['setting']} @{c['sparsity']}", c["sparse"])
                                           for c in sorted(rows, key=lambda c: (c["setting"], c["sparsity"])) if c["protocol"] == protocol]
            base = dense["mean"]["acc"] if kind == "tasks" else dense["gsm8k_cot"]["acc"]
            for name, scores in entries:
                accs = [_pct((scores.get(t) or {}).get("acc"), (scores.get(t) or {}).get("acc_stderr")) for t in tasks]
                value = scores["mean"]["acc"] if kind == "tasks" else scores["gsm8k_cot"]["acc"]
                drop = "" if name == "dense" else f"{100 * (base - value):+.1f}"
                tail = f" | **{_pct(value, _mean_se(scores, tasks))}** | {drop} |" if kind == "tasks" else f" | {drop} |"
                lines.append(f"| {protocol} | {name} | " + " | ".join(accs) + tail)
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in report["commands"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
