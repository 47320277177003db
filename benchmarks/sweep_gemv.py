"""Second sweep of the batch-1 gated GEMV's launch shapes, with the one-row accumulator (``acc1d``) and the
programs per multiprocessor (``waves``) that fewer registers allow.

    python benchmarks/sweep_gemv.py [--out DIR] [--shapes qkv,o,gate_up,down]

Why: at sparsity 0.5 the kernel streams the kept rows at 2.1 to 2.9 TB/s of the H200's ~4.2
(the kernel table before this sweep: ``git show 974741a:benchmarks/results/h200/kernels_h200.txt``). Its ``[BLOCK_K, BLOCK_N]`` fp32 accumulator takes twice the
registers of the weight tile, so only about two programs fit on a multiprocessor, and with half of each
tile's rows masked off only ~32 KB of useful weight bytes are in flight per SM, short of what the
memory's latency needs. The one-row accumulator frees those registers for more programs (or bigger tiles).
Every config is first checked against the float64 reference, then timed from CUDA-graph replays at 0.5;
the best ten are timed at 0 / 0.4 / 0.65 too and scored like ``bench_kernels.py --sweep``
(t0.4 + t0.5 + t0.65 + t0/2). Writes DIR/sweep_gemv.txt and DIR/sweep_gemv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, Case  # noqa: E402

from wina_convert.runtime.kernels import launch as K  # noqa: E402


def grid(acc1d_only: bool = False, waves_list=(2, 3, 4, 6), widths=(512, 1024, 2048), depths=(8, 16, 32)) -> list[K.Config]:
    configs = []
    for acc1d in (True,) if acc1d_only else (False, True):
        for pipe in (False,) if acc1d_only else (False, True):
            if acc1d and pipe:
                continue  # pipe already sums each tile into a row
            for bn in widths:
                for bk in depths:
                    for nw in (4, 8):
                        per_thread = bn * bk / (32 * nw)
                        if not 16 <= per_thread <= 256 or (not acc1d and not pipe and per_thread > 128):
                            continue
                        for waves in waves_list:
                            configs.append(K.Config(block_n=bn, block_k=bk, num_warps=nw, num_stages=1, waves=waves,
                                                    prefetch=False, pipe=pipe, acc1d=acc1d))
    return configs


def fmt(cfg: K.Config) -> str:
    return (f"bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} wv{cfg.waves} pipe{int(cfg.pipe)} acc1d{int(cfg.acc1d)}")


def error(case: Case, cfg: K.Config, thr: torch.Tensor) -> float:
    sp = case.splits if len(case.splits) > 1 else None
    y = K._gemv(case.x, case.Wt[0], thr, sp, None, cfg=cfg).double()
    ref = K.reference_gated_linear(case.x.double(), case.Wt[0].double(), thr, sp).reshape(-1)
    return float((y - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--acc1d-only", action="store_true", help="second round: only the one-row accumulator")
    ap.add_argument("--waves", default="2,3,4,6")
    ap.add_argument("--widths", default="512,1024,2048")
    ap.add_argument("--depths", default="8,16,32")
    ap.add_argument("--name", default="sweep_gemv")
    args = ap.parse_args()
    lines, result = [], {"device": torch.cuda.get_device_name(0), "shapes": {}}

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    ints = lambda text: tuple(float(v) if "." in v else int(v) for v in text.split(","))  # noqa: E731
    configs = grid(args.acc1d_only, ints(args.waves), ints(args.widths), ints(args.depths))
    log(f"{result['device']}: {len(configs)} configs per shape")
    for name in args.shapes.split(","):
        case = Case(name, *SHAPES[name])
        thr = {s: case.thr(s) for s in (0.0, 0.4, 0.5, 0.65)}
        current = K.TUNED_GEMV.get((case.n_in, case.n_out), K.DEFAULT_GEMV)
        timed = []
        for cfg in [current] + configs:
            try:
                err = error(case, cfg, thr[0.5])
                if not err < 1e-2:
                    log(f"  {name} {fmt(cfg)}: relative error {err:.2e}, skipped")
                    continue
                timed.append((case.t_gated(0.5, cfg, thr[0.5]), cfg, err))
            except Exception as e:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
                log(f"  {name} {fmt(cfg)} failed: {type(e).__name__}: {str(e)[:80]}")
        base = timed[0]
        timed.sort(key=lambda r: r[0])
        log(f"[0.5] {name}: current {base[0]:.1f}us ({fmt(base[1])}); best: " +
            "; ".join(f"{t:.1f} {fmt(c)}" for t, c, _ in timed[:8]))
        scored = []
        for t5, cfg, err in timed[:10] + ([base] if base not in timed[:10] else []):
            ts = {s: (t5 if s == 0.5 else case.t_gated(s, cfg, thr[s])) for s in (0.0, 0.4, 0.5, 0.65)}
            scored.append((ts[0.4] + ts[0.5] + ts[0.65] + 0.5 * ts[0.0], cfg, ts, err))
        scored.sort(key=lambda r: r[0])
        need = {s: case.needed_bytes(thr[s]) for s in thr}
        for score, cfg, ts, err in scored:
            mark = " (current)" if cfg == current else ""
            log(f"  {name} score {score:6.1f} {fmt(cfg)}{mark} err {err:.1e} | " +
                " ".join(f"s{s}: {t:.1f}us {need[s] / t / 1e3:.0f}GB/s" for s, t in ts.items()))
        result["shapes"][name] = [dict(score=sc, cfg=c.__dict__, us=ts) for sc, c, ts, _ in scored]
        del case
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.txt").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
