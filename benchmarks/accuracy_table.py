"""Accuracy at equal decode bytes: TEAL vs WINA and the levers of ``wina convert``, at several sparsities.

    python benchmarks/accuracy_table.py MODEL --out DIR [--device cuda] [--sparsities 0.4,0.5,0.65]
        [--settings NAME,...] [--samples N --seq-len N] [--max-tokens N] [--speed-curve FILE]
        [--tasks piqa,arc_easy,... --limit N] [--off-target 0.4,0.65] [--append] [--render]

MODEL is anything ``wina convert`` takes: a Hugging Face directory or a .gguf file (e.g.
~/.cache/wina-convert/smollm2-hf, or the GGUF itself on a machine that only has the GGUF). Every
cell is a real ``wina_convert.convert`` at that sparsity (bundled calibration set, convert's
defaults unless --samples/--seq-len) followed by ``wina_convert.evaluate`` on the bundled held-out
text, which calibration never reads. Sparsity counts decode bytes (docs/method.md, section 6, "Sparsity means bytes"):
every setting at 0.5 reads half the dense bytes of the gated sub-blocks, shortcut rotations included.

Per cell: held-out perplexity, achieved parameter-weighted sparsity, kept-bytes fraction (bytes the
gated sub-blocks read per token over their dense bytes), bytes per token (plus lm_head and one
embedding row) and, with ``--speed-curve FILE`` (a JSON list of ``{"kept_bytes_fraction",
"tokens_per_s"}`` measured on a GPU), the decode tokens/s interpolated at the cell's kept-bytes
fraction (blank without it). ``--tasks`` adds zero-shot accuracy (``wina eval --tasks``'s runner,
``--limit`` items per task). ``--off-target 0.4,0.65`` also evaluates each setting's 0.5 checkpoint
at those sparsities (issue 16 item 5: no recalibration); ``--append`` adds rows and cells to an
existing DIR/accuracy.json (to build a table in several runs). Writes DIR/accuracy.md, DIR/accuracy.json
and DIR/frontier.png (perplexity against kept-bytes fraction, or tokens/s with a speed curve).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from wina_convert import convert, evaluate
from wina_convert.defaults import DEFAULTS

SPARSITIES = (0.4, 0.5, 0.65)
OFF_TARGET_FROM = 0.5

# name -> convert options (+ "topk": evaluate with per-token top-k instead of thresholds)
SETTINGS: dict[str, dict[str, Any]] = {
    "teal": {"method": "teal", "allocation": "greedy"},
    "wina": {"method": "wina", "allocation": "greedy"},
    "teal-uniform": {"method": "teal", "allocation": "uniform"},
    "wina-topk": {"method": "wina", "allocation": "greedy", "topk": True},
    "teal-topk": {"method": "teal", "allocation": "greedy", "topk": True},
    "wina-global": {"method": "wina", "allocation": "global"},
    "teal-global": {"method": "teal", "allocation": "global"},
    "wina-output": {"method": "wina", "allocation": "output"},
    "teal-output": {"method": "teal", "allocation": "output"},
    # the output head gated inside the target's bytes, its share searched (--head-sparsity auto)
    "wina-output-head": {"method": "wina", "allocation": "output", "head_sparsity": "auto"},
    "teal-output-head": {"method": "teal", "allocation": "output", "head_sparsity": "auto"},
    "wina-heads": {"method": "wina", "allocation": "greedy", "head_bases": "pca"},
    "teal-heads": {"method": "teal", "allocation": "greedy", "head_bases": "pca"},
    "wina-center": {"method": "wina", "allocation": "greedy", "center": "median"},
    "wina-transform": {"method": "wina", "allocation": "greedy", "transform": True},
    "teal-transform": {"method": "teal", "allocation": "greedy", "transform": True},
    "wina-transform-pca": {"method": "wina", "allocation": "greedy", "transform": True, "basis": "pca"},
    "teal-transform-pca": {"method": "teal", "allocation": "greedy", "transform": True, "basis": "pca"},
    "wina-transform-pooled": {"method": "wina", "allocation": "greedy", "transform": True, "basis": "pooled"},
    "teal-transform-pooled": {"method": "teal", "allocation": "greedy", "transform": True, "basis": "pooled"},
    # low-rank compensation of the dropped channels (rank per gated matrix), paid for in bytes
    "wina-lowrank4": {"method": "wina", "allocation": "greedy", "lowrank": "4"},
    "wina-lowrank8": {"method": "wina", "allocation": "greedy", "lowrank": "8"},
    "wina-lowrank16": {"method": "wina", "allocation": "greedy", "lowrank": "16"},
    "wina-lowrank32": {"method": "wina", "allocation": "greedy", "lowrank": "32"},
    "wina-lowrank-down32": {"method": "wina", "allocation": "greedy", "lowrank": "down=32"},
    "teal-lowrank8": {"method": "teal", "allocation": "greedy", "lowrank": "8"},
    # every default (the head in the budget since 2026-12-03), with one lever on top
    "default": {"defaults": True},
    "default-lowrank4": {"defaults": True, "lowrank": "4"},
    "default-lowrank8": {"defaults": True, "lowrank": "8"},
    "default-lowrank16": {"defaults": True, "lowrank": "16"},
    "default-self": {"defaults": True, "calibration": "self"},
}
CONVERT_KEYS = ("method", "allocation", "transform", "basis", "center", "head_bases", "lowrank", "head_sparsity")


def options(setting: dict[str, Any]) -> dict[str, Any]:
    """The convert options of a setting: the defaults, overridden by the setting. A comparison setting keeps the
    output head dense unless it names a head (they were measured so before the head joined the defaults); the
    ``default`` settings take every default, the head's included."""
    base = DEFAULTS if setting.get("defaults") else {**DEFAULTS, "head_sparsity": 0.0}
    return {key: setting.get(key, base[key]) for key in CONVERT_KEYS}


def label(name: str, setting: dict[str, Any]) -> str:
    opts = options(setting)
    parts = [opts["method"].upper(), opts["allocation"]]
    if opts["transform"]:
        parts.append("transform" if opts["basis"] == "svd" else f"transform ({opts['basis']} basis)")
    if opts["head_bases"] != "none":
        parts.append(f"head bases {opts['head_bases']}")
    if opts["center"] != "none":
        parts.append(f"center {opts['center']}")
    if str(opts["lowrank"]) != "0":
        parts.append(f"low-rank {opts['lowrank']}")
    if opts["head_sparsity"] == "auto":
        parts.append("head in the budget")
    elif opts["head_sparsity"]:
        parts.append(f"head at {opts['head_sparsity']} on top")
    if setting.get("topk"):
        parts.append("top-k eval")
    if setting.get("calibration") == "self":
        parts.append("self-calibration")
    text = f"`{name}`: " + ", ".join(parts)
    return f"**{text} (default)**" if name == "default" else text


def speed_at(curve: list[dict[str, float]] | None, kept: float) -> float | None:
    """Tokens/s at a kept-bytes fraction, linearly interpolated on the measured curve (None outside it)."""
    if not curve:
        return None
    points = sorted((float(p["kept_bytes_fraction"]), float(p["tokens_per_s"])) for p in curve)
    if not points[0][0] - 1e-9 <= kept <= points[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= kept <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kept - x0) / (x1 - x0)
    return points[0][1]


def read_curve(path: Path | None) -> list[dict[str, float]] | None:
    if path is None:
        return None
    curve = json.loads(path.read_text())
    if not isinstance(curve, list) or not all({"kept_bytes_fraction", "tokens_per_s"} <= set(p) for p in curve):
        raise SystemExit(f"{path}: expected a JSON list of {{kept_bytes_fraction, tokens_per_s}} objects")
    return curve


def measure(directory: Path, sparsity: float, setting: dict[str, Any], args: argparse.Namespace,
            curve: list[dict[str, float]] | None, tasks: bool = True) -> dict[str, Any]:
    """One evaluation of a checkpoint at ``sparsity``: perplexity, sparsity, bytes, speed, and (``tasks``
    and ``--tasks``) the zero-shot tasks."""
    from wina_convert import load

    model = load(directory, sparsity=0, device=args.device)
    ev = evaluate(model, sparsity=sparsity, device=args.device, max_tokens=args.max_tokens, seq_len=args.eval_seq_len,
                  topk=bool(setting.get("topk")), protocol=args.protocol)
    row = {"perplexity": ev["perplexity"], "dense_perplexity": ev["dense_perplexity"], "sparsity": ev["sparsity"],
           "kept_bytes_fraction": ev["kept_bytes_fraction"], "bytes_per_token": ev["bytes_per_token"],
           "tokens_per_s": speed_at(curve, ev["kept_bytes_fraction"]), "by_role": ev["by_role"],
           "head_sparsity": ev.get("head_sparsity"),
           "tokens": ev["tokens"], "text": ev["text"]}
    if tasks and args.tasks:
        try:
            from wina_convert.evaluate.tasks import evaluate_tasks
        except ImportError:
            print("zero-shot tasks skipped: this wina-convert has no task runner (wina_convert.evaluate.tasks)")
        else:
            if setting.get("topk"):
                model.wina.set_topk(True)
            row["tasks"] = run_task_groups(model, sparsity, args)
    return row


DENSE_TASKS: dict[str, Any] = {}  # the dense scores, measured once per run (every checkpoint's dense model is the same)


def run_task_groups(model: Any, sparsity: float, args: argparse.Namespace) -> dict[str, Any]:
    """Dense (first time only) and sparse task scores; MMLU with its own per-subject limit (``--mmlu-limit``)."""
    from wina_convert.evaluate.tasks import evaluate_tasks, mean_scores

    names = args.tasks.split(",")
    groups = [([n for n in names if n != "mmlu"], args.limit), (["mmlu"] if "mmlu" in names else [], args.mmlu_limit)]
    dense, sparse = {}, {}
    for group, limit in groups:
        if not group:
            continue
        key = ",".join(group)
        out = evaluate_tasks(model, group, limit=limit, sparsity=sparsity, device=args.device,
                             batch_size=args.batch_size, dense=key not in DENSE_TASKS, protocol=args.protocol)
        if out["dense"] is not None:
            DENSE_TASKS[key] = out["dense"]
        dense.update({k: v for k, v in DENSE_TASKS[key].items() if k != "mean"})
        sparse.update({k: v for k, v in out["sparse"].items() if k != "mean"})
    return {"dense": {**dense, "mean": mean_scores(dense)}, "sparse": {**sparse, "mean": mean_scores(sparse)}}


def mean_accuracy(scores: dict[str, Any] | None) -> float | None:
    if not scores:
        return None
    mean = scores.get("mean")
    if isinstance(mean, dict):
        return mean.get("acc")
    return mean if isinstance(mean, (int, float)) else None


def markdown(report: dict[str, Any]) -> str:
    sparsities = report["sparsities"]
    dense = report.get("dense_perplexity")
    lines = [f"Model: `{report['model']}`, device {report['device']}; calibration {report['calibration']}; "
             f"held-out: {report.get('heldout', '?')}; protocol {report.get('protocol', 'all-tokens')} (gated tokens).",
             f"Dense perplexity: **{dense:.2f}**." if dense else "",
             "Each cell: perplexity (ratio to dense) / achieved parameter-weighted sparsity / kept-bytes fraction"
             + (" / tokens/s" if report.get("speed_curve") else "") + ". Sparsity counts bytes: every cell of a column "
             "reads the same bytes of the gated sub-blocks.", "",
             "| setting | " + " | ".join(f"@{s}" for s in sparsities) + " | calibrate s |",
             "|---|" + "---|" * (len(sparsities) + 1)]
    for row in report["rows"]:
        cells = []
        for s in sparsities:
            r = row["results"].get(str(s))
            if r is None:
                cells.append("")
                continue
            cell = f"{r['perplexity']:.2f} ({r['perplexity'] / r['dense_perplexity']:.2f}x) / {r['sparsity']:.3f} / {r['kept_bytes_fraction']:.3f}"
            if r.get("tokens_per_s") is not None:
                cell += f" / {r['tokens_per_s']:.0f}"
            acc = mean_accuracy((r.get("tasks") or {}).get("sparse"))
            if acc is not None:
                cell += f" / acc {100 * acc:.1f}"
            cells.append(cell)
        seconds = [r["calibrate_s"] for r in row["results"].values() if r.get("calibrate_s") is not None]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {sum(seconds) / len(seconds):.0f} |" if seconds
                     else f"| {row['label']} | " + " | ".join(cells) + " | |")
    off = [row for row in report["rows"] if row.get("off_target")]
    if off:
        others = sorted({float(s) for row in off for s in row["off_target"]})
        lines += ["", f"Off-target (item 5): the checkpoint calibrated at {OFF_TARGET_FROM}, run at other sparsities "
                  "without recalibration, against the one calibrated there. Each cell: perplexity / achieved "
                  "kept-bytes fraction.", "",
                  "| setting | " + " | ".join(f"@{s} from {OFF_TARGET_FROM} | @{s} calibrated" for s in others) + " |",
                  "|---|" + "---|---|" * len(others)]
        for row in off:
            cells = []
            for s in others:
                for r in (row["off_target"].get(str(s)), row["results"].get(str(s))):
                    cells.append("" if r is None else f"{r['perplexity']:.2f} / {r['kept_bytes_fraction']:.3f}")
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if report.get("tasks"):
        tasks = report["tasks"].split(",") if isinstance(report["tasks"], str) else list(report["tasks"])
        lines += ["", f"Zero-shot accuracy (lm-eval stock prompts, local data; `acc` in %, the mean ± its standard error; "
                  f"limit {report.get('limit')} items per task, {report.get('mmlu_limit')} per MMLU subject):", "",
                  "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        dense_row = None
        entries = []
        for row in report["rows"]:
            for s in sparsities:
                r = row["results"].get(str(s))
                if r and r.get("tasks"):
                    dense_row = dense_row or r["tasks"]["dense"]
                    entries.append((f"{row['name']} @{s}", r["tasks"]["sparse"]))
        if dense_row:
            entries.insert(0, ("dense", dense_row))

        def pct(v: Any) -> str:
            return "" if v is None else f"{100 * v:.1f}"

        for name, scores in entries:
            cells = [pct((scores.get(t) or {}).get("acc")) for t in tasks]
            errors = [(scores.get(t) or {}).get("acc_stderr") for t in tasks]
            se = (sum(e * e for e in errors) ** 0.5 / len(errors)) if errors and None not in errors else None
            lines.append(f"| {name} | " + " | ".join(cells) + f" | **{pct(mean_accuracy(scores))}**"
                         + (f" ± {100 * se:.1f}" if se is not None else "") + " |")
    lines.append("")
    minutes = (report.get("seconds", 0) + report.get("seconds_before", 0)) / 60
    lines.append(f"Command: `{report['command']}` ({minutes:.0f} min in all).")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Perplexity against kept-bytes fraction (or tokens/s when a speed curve was given), one line per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("frontier.png skipped: pip install matplotlib")
        return False
    speed = bool(report.get("speed_curve"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report["rows"]:
        points = sorted((r["tokens_per_s"] if speed else r["kept_bytes_fraction"], r["perplexity"])
                        for r in row["results"].values() if not speed or r.get("tokens_per_s") is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=row["name"])
    if report.get("dense_perplexity"):
        ax.axhline(report["dense_perplexity"], color="gray", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("decode tokens/s (speed curve)" if speed else "kept-bytes fraction of the gated sub-blocks")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{Path(report['model']).name}: accuracy vs decode cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def merge(directories: list[Path], out: Path) -> None:
    """One report from several runs of one model (e.g. parallel processes on one GPU, one setting each)."""
    reports = [json.loads((d / "accuracy.json").read_text()) for d in directories if (d / "accuracy.json").is_file()]
    if not reports:
        raise SystemExit("--merge: none of the directories has an accuracy.json")
    merged = dict(reports[0])
    merged["rows"] = []
    for row in (row for r in reports for row in r["rows"]):  # one row per setting, its cells from every run
        same = next((m for m in merged["rows"] if m["name"] == row["name"]), None)
        if same is None:
            merged["rows"].append({**row, "results": dict(row["results"]), "off_target": dict(row.get("off_target") or {})})
        else:
            same["results"].update(row["results"])
            same["off_target"].update(row.get("off_target") or {})
    for row in merged["rows"]:
        row["results"] = dict(sorted(row["results"].items(), key=lambda kv: float(kv[0])))
    for log in (d for d in directories if d.suffix == ".log"):  # a run whose accuracy.json was lost: its cells' lines
        rows: dict[str, dict[str, Any]] = {}
        for line in log.read_text().splitlines():
            if not line.startswith('{"setting"'):
                continue
            cell = json.loads(line)
            name = cell["setting"]
            row = rows.setdefault(name, {"name": name, "label": label(name, SETTINGS[name]) + " (from its log: no tasks)",
                                         "options": options(SETTINGS[name]), "topk": bool(SETTINGS[name].get("topk")),
                                         "results": {}})
            row["results"][str(cell["target"])] = {
                "perplexity": cell["perplexity"], "dense_perplexity": cell["dense"], "sparsity": cell["sparsity"],
                "kept_bytes_fraction": cell["kept_bytes"], "tokens_per_s": speed_at(merged.get("speed_curve"), cell["kept_bytes"]),
                "calibrate_s": None, "convert_s": cell["convert_s"]}
        merged["rows"] += [r for r in rows.values() if not any(r["name"] == m["name"] for m in merged["rows"])]
    merged["sparsities"] = sorted({s for r in reports for s in r["sparsities"]})
    merged["command"] = "; ".join(r["command"] for r in reports)
    merged["seconds"] = max(r.get("seconds", 0) for r in reports)  # they ran side by side
    merged["seconds_before"] = 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(merged, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(merged))
    plot(merged, out / "frontier.png")
    print(markdown(merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine the accuracy.json of these directories (runs of one model) into --out, and render it; "
                             "a .log of a run adds the cells it printed (perplexity, sparsity, bytes) for settings not in a json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--settings", default="teal,wina,wina-topk,wina-heads,wina-center,wina-transform,default",
                        help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default: convert's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default: convert's)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens to evaluate")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per held-out window")
    parser.add_argument("--protocol", default="all-tokens", choices=["all-tokens", "deployed"],
                        help="which tokens are gated (wina eval --protocol); all-tokens, the papers' and this table's "
                             "published protocol (benchmarks/deployed_table.py compares both)")
    parser.add_argument("--speed-curve", type=Path, default=None)
    parser.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. piqa,arc_easy (needs the [eval] extra and data)")
    parser.add_argument("--limit", type=int, default=None, help="items per task")
    parser.add_argument("--mmlu-limit", type=int, default=None, help="items per MMLU subject (57 subjects; default: --limit)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size for the tasks")
    parser.add_argument("--task-settings", default=None, help="run the tasks only for these settings (default: all)")
    parser.add_argument("--off-target", default=None,
                        help=f"comma-separated sparsities at which each {OFF_TARGET_FROM} checkpoint is also run (no recalibration)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wina-accuracy-table"))
    parser.add_argument("--append", action="store_true", help="add rows (and cells) to DIR/accuracy.json instead of starting anew")
    parser.add_argument("--render", action="store_true", help="only re-render DIR/accuracy.md and frontier.png from DIR/accuracy.json")
    args = parser.parse_args()
    if args.mmlu_limit is None:
        args.mmlu_limit = args.limit
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.render:
        report = json.loads((args.out / "accuracy.json").read_text())
        (args.out / "accuracy.md").write_text(markdown(report))
        plot(report, args.out / "frontier.png")
        print(markdown(report))
        return
    if args.model is None:
        parser.error("MODEL is required (except with --merge or --render)")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: choose from {', '.join(SETTINGS)}")
    curve = read_curve(args.speed_curve)
    args.out.mkdir(parents=True, exist_ok=True)
    import sys

    report: dict[str, Any] = {"model": str(args.model), "device": args.device, "sparsities": sparsities, "protocol": args.protocol,
                              "defaults": DEFAULTS, "rows": [], "speed_curve": curve, "tasks": args.tasks, "limit": args.limit, "mmlu_limit": args.mmlu_limit,
                              "calibration": f"bundled set, {args.samples or 'default'} x {args.seq_len or 'default'} tokens",
                              "command": "python benchmarks/accuracy_table.py " + " ".join(sys.argv[1:])}
    previous = json.loads((args.out / "accuracy.json").read_text()) if args.append and (args.out / "accuracy.json").is_file() else None
    if previous is not None:
        report["rows"] = previous["rows"]
        report["sparsities"] = sorted(set(previous["sparsities"]) | set(sparsities))
        report["command"] = previous["command"] + "; " + report["command"]
        report["seconds_before"] = previous.get("seconds", 0) + previous.get("seconds_before", 0)
    start = time.perf_counter()
    for name in names:
        setting = SETTINGS[name]
        row: dict[str, Any] = {"name": name, "label": label(name, setting), "options": options(setting),
                               "topk": bool(setting.get("topk")), "results": {}}
        for old in [r for r in report["rows"] if r["name"] == name]:  # --append: extend the row
            row["results"], row["off_target"] = old["results"], old.get("off_target")
            report["rows"].remove(old)
        for sparsity in sparsities:
            target = args.work / f"{name}-{sparsity}"
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.perf_counter()
            result = convert(args.model, target, sparsity=sparsity, device=args.device, samples=args.samples,
                             seq_len=args.seq_len, calibration=setting.get("calibration"), quiet=True, **options(setting))
            convert_s = time.perf_counter() - t0
            with_tasks = args.task_settings is None or name in args.task_settings.split(",")
            r = measure(target, sparsity, setting, args, curve, tasks=with_tasks)
            r.update(convert_s=convert_s, calibrate_s=result.stage_seconds.get("calibrate", 0.0) + result.stage_seconds.get("search", 0.0))
            row["results"][str(sparsity)] = r
            report["dense_perplexity"] = r["dense_perplexity"]
            report["heldout"] = f"{r['tokens']} tokens of {r['text']}"
            print(json.dumps({"setting": name, "target": sparsity, "perplexity": round(r["perplexity"], 3),
                              "sparsity": round(r["sparsity"], 4), "kept_bytes": round(r["kept_bytes_fraction"], 4),
                              "dense": round(r["dense_perplexity"], 3), "convert_s": round(convert_s, 1)}), flush=True)
            if args.off_target and sparsity == OFF_TARGET_FROM:
                # off-target: perplexity and bytes (issue 16 item 5)
                row["off_target"] = {str(float(s)): measure(target, float(s), setting, args, curve, tasks=False)
                                     for s in args.off_target.split(",")}
            shutil.rmtree(target, ignore_errors=True)
            report["seconds"] = time.perf_counter() - start
            rows = [*report["rows"], row]  # written after every cell: a run stopped early keeps what it measured
            (args.out / "accuracy.json").write_text(json.dumps({**report, "rows": rows}, indent=1) + "\n")
            (args.out / "accuracy.md").write_text(markdown({**report, "rows": rows}))
        report["rows"].append(row)
    plot(report, args.out / "frontier.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
