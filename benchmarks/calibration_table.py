"""Perplexity and achieved sparsity on held-out text: dense, TEAL, WINA +- transform, uniform/greedy.

    python benchmarks/calibration_table.py MODEL --out DIR [--device cuda] [--sparsities 0.25,0.4,0.5,0.65]
                                           [--only NAME,...] [--self-calibration] [--render]

MODEL is anything ``wina convert`` takes (the README's SmolLM2 directory, ~/.cache/wina-convert/smollm2-hf).
Every setting is a real ``wina_convert.convert`` (bundled calibration set, its defaults for samples,
sequence length and seed) followed by ``wina_convert.evaluate`` on the bundled held-out text (wina_convert/calibration/data/heldout),
which calibration never reads. ``--self-calibration`` adds the default setting calibrated on text the
model writes itself (``--calibration self``). Writes DIR/calibration.md (the table) and
DIR/calibration.json (every number, with convert's time per stage).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

from wina_convert import convert, evaluate
from wina_convert.defaults import DEFAULTS

SPARSITIES = (0.25, 0.4, 0.5, 0.65)


def settings(self_calibration: bool) -> list[dict]:
    out = [{"name": f"{method}-{'t' if transform else 'nt'}-{allocation}", "method": method, "transform": transform,
            "allocation": allocation, "calibration": None}
           for method, transform, allocation in itertools.product(("teal", "wina"), (False, True), ("uniform", "greedy"))]
    if self_calibration:
        out.append({**DEFAULTS, "name": "default-self", "calibration": "self"})
    return out


def label(s: dict) -> str:
    text = f"{s['method'].upper()}, {'transform' if s['transform'] else 'no transform'}, {s['allocation']}"
    if s["calibration"] == "self":
        text += ", self-calibration"
    if all(s[k] == v for k, v in DEFAULTS.items()) and s["calibration"] is None:
        text = f"**{text} (default)**"
    return text


def markdown(report: dict) -> str:
    sparsities = report["sparsities"]
    lines = [f"Model: `{report['model']}`, device {report['device']}; held-out: {report['heldout']}.",
             f"Dense perplexity: **{report['dense_perplexity']:.2f}**. Each cell: perplexity (achieved sparsity).", "",
             "| setting | " + " | ".join(f"@{s}" for s in sparsities) + " | calibrate s |",
             "|---|" + "---|" * (len(sparsities) + 1)]
    for row in report["rows"]:
        cells = []
        for s in sparsities:
            r = row["results"].get(str(s))
            cells.append("" if r is None else f"{r['perplexity']:.2f} ({r['sparsity']:.3f})")
        seconds = [r["stages"].get("calibrate", 0.0) for r in row["results"].values()]
        lines.append(f"| {label(row)} | " + " | ".join(cells) + f" | {sum(seconds) / max(len(seconds), 1):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--only", default=None, help="comma-separated setting names (e.g. wina-nt-greedy)")
    parser.add_argument("--self-calibration", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wina-calibration-table"))
    parser.add_argument("--render", action="store_true", help="only re-render DIR/calibration.md from DIR/calibration.json")
    args = parser.parse_args()
    if args.render:
        report = json.loads((args.out / "calibration.json").read_text())
        report["defaults"] = DEFAULTS
        (args.out / "calibration.md").write_text(markdown(report))
        print(markdown(report))
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    chosen = settings(args.self_calibration)
    if args.only:
        names = args.only.split(",")
        chosen = [s for s in chosen if s["name"] in names]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "device": args.device, "sparsities": sparsities, "rows": [],
              "defaults": DEFAULTS}
    for setting in chosen:
        row = {**setting, "results": {}}
        for sparsity in sparsities:
            target = args.work / f"{setting['name']}-{sparsity}"
            shutil.rmtree(target, ignore_errors=True)
            start = time.perf_counter()
            result = convert(args.model, target, sparsity=sparsity, transform=setting["transform"],
                             allocation=setting["allocation"], method=setting["method"],
                             calibration=setting["calibration"], device=args.device, quiet=True)
            seconds = time.perf_counter() - start
            ev = evaluate(target, sparsity=sparsity, device=args.device)
            report["dense_perplexity"] = ev["dense_perplexity"]
            report["heldout"] = f"{ev['tokens']} tokens of {ev.get('text', 'calibration/heldout')}"
            row["results"][str(sparsity)] = {"perplexity": ev["perplexity"], "sparsity": ev["sparsity"],
                                             "by_role": ev.get("by_role"), "convert_s": seconds,
                                             "stages": result.stage_seconds}
            print(json.dumps({"setting": setting["name"], "target": sparsity, "perplexity": round(ev["perplexity"], 3),
                              "sparsity": round(ev["sparsity"], 4), "dense": round(ev["dense_perplexity"], 3),
                              "convert_s": round(seconds, 1)}), flush=True)
            shutil.rmtree(target, ignore_errors=True)
        report["rows"].append(row)
        (args.out / "calibration.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "calibration.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
