"""Which factors for ``--lowrank``: the activation-aware fit against R-Sparse's plain SVD of ``W``, same bytes.

    python benchmarks/lowrank_ablation.py MODEL --out DIR [--rank 16] [--sparsity 0.5] [--samples 8 --seq-len 256]
        [--max-tokens 4096]

Converts MODEL once with ``--lowrank RANK --allocation greedy`` and evaluates that checkpoint at the target
on the bundled held-out text three ways, at the very same thresholds (so the first two read the same bytes):

* ``fitted``: the factors as converted (``A B = [W L]_r L^-1``, ``L L^T`` the dropped part's second moment);
* ``svd``: each gate's factors replaced by the top-``r`` SVD of its weight, ``A = U_r s_r``, ``B = V_r^T``
  (R-Sparse's low-rank part, without its search);
* ``none``: no compensation (the thresholds skip more columns than plain WINA at this byte target, and
  nothing is added back: fewer bytes read).

Writes DIR/lowrank_ablation.json and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from wina_convert import convert, evaluate, load


def svd_factors(gate) -> tuple[torch.Tensor, torch.Tensor]:
    """R-Sparse's factors of a gate: the top-r SVD of each stacked matrix's weight."""
    rank = gate.lowrank_a.shape[1]
    a_parts, b_parts, start = [], [], 0
    for size in gate.splits:
        u, s, vh = torch.linalg.svd(gate.weight[start : start + size].detach().double(), full_matrices=False)
        a_parts.append((u[:, :rank] * s[:rank]).float())
        b_parts.append(vh[:rank].float())
        start += size
    return torch.cat(a_parts), torch.stack(b_parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "checkpoint"
    start = time.time()
    convert(args.model, target, sparsity=args.sparsity, lowrank=str(args.rank), allocation="greedy",
            samples=args.samples, seq_len=args.seq_len, quiet=True, overwrite=True)
    results = {}
    for variant in ("fitted", "svd", "none"):
        model = load(target, sparsity=args.sparsity)
        for gate in model.wina.gates.values():
            if variant == "svd":
                gate.set_lowrank(*svd_factors(gate))
            elif variant == "none":
                gate.set_lowrank(None, None)
        ev = evaluate(model, sparsity=args.sparsity, max_tokens=args.max_tokens, seq_len=args.eval_seq_len)
        results[variant] = {k: ev[k] for k in ("perplexity", "dense_perplexity", "sparsity", "kept_bytes_fraction")}
        print(json.dumps({"variant": variant, **results[variant]}), flush=True)
    shutil.rmtree(target, ignore_errors=True)
    report = {"model": args.model, "rank": args.rank, "sparsity": args.sparsity, "samples": args.samples,
              "seq_len": args.seq_len, "max_tokens": args.max_tokens, "results": results,
              "seconds": time.time() - start}
    (args.out / "lowrank_ablation.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
