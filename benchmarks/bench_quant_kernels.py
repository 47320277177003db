"""Per-matrix benchmark of the quantized gated GEMV (runtime/kernels/quant.py) at Llama-3-8B shapes, one GPU.

    python benchmarks/bench_quant_kernels.py [--out DIR] [--name quant_kernels_h100] [--sweep] [--rows 2,4,8]

Per matrix (q/k/v fused, o, gate/up fused, down), batch 1, GPU microseconds per call from CUDA-graph replays,
weights rotated over more than 4x the L2 (so every call reads its weight from memory):

* bf16 dense through cuBLAS (``F.linear``) and our bf16 gated kernel (``launch._gemv``) at 0 / 0.5 / 0.65;
* torch's int4 weight-only GEMM, group 128 (``_weight_int4pack_mm``, gpt-fast's and torchao's path);
* our int4 (asymmetric, group 128 along the outputs) and int8 (symmetric, group 128) gated kernels at
  0 / 0.5 / 0.65, and int4 with groups of 32 along the inputs (GGUF Q4_0's shape) at 0.5;
* kept-byte bandwidth: the bytes of the kept rows (codes, scales, offsets) over the time, against the read
  bandwidth measured here (a sum over 1 GiB).

``--sweep`` first times a few launch shapes per matrix and precision at sparsity 0.5 and uses the fastest
(printed, for ``quant.TUNED``). ``--rows`` adds a few sequences per step: the gated kernel at 0.5 against
the same kernel dense (thresholds -inf) and torch's int4 GEMM. Thresholds drop exactly the given fraction
of channels per matrix (bench_kernels.exact_thresholds). The table goes last and to DIR/NAME.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, exact_thresholds, gtime  # noqa: E402

from wina_convert.quant import QuantizedWeight  # noqa: E402
from wina_convert.runtime.kernels import launch as K  # noqa: E402
from wina_convert.runtime.kernels import quant as qk  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SPARSITIES = (0.0, 0.5, 0.65)


def rotating(make, nbytes: int, l2: int):
    """As many copies of ``make()`` as needed for more than 4x the L2 (at least 2)."""
    return [make() for _ in range(max(2, math.ceil(4 * l2 / nbytes)))]


def random_quant(n_in: int, n_out: int, bits: int, along_in: bool, group: int, offsets: bool) -> QuantizedWeight:
    q = (torch.randint(0, 256, (n_in, n_out // 2), dtype=torch.uint8, device=DEV) if bits == 4
         else torch.randint(-127, 128, (n_in, n_out), dtype=torch.int8, device=DEV))
    shape = (n_in // group, n_out) if along_in else (n_in, n_out // group)
    s = (torch.rand(shape, device=DEV) * 0.002 + 1e-4).half()
    m = (torch.randn(shape, device=DEV) * 0.01).half() if offsets else None
    return QuantizedWeight(q, s, m)


def int4pack(n_in: int, n_out: int, group: int = 128):
    """torch's int4 weight-only layout (``_convert_weight_to_int4pack``, inner k tiles 8) of a random weight,
    and its bf16 scales-and-zeros ``[in / group, out, 2]``; None if this torch lacks it."""
    codes = torch.randint(0, 16, (n_out, n_in), dtype=torch.int32, device=DEV)
    sz = torch.stack([torch.rand(n_in // group, n_out, device=DEV) * 0.002 + 1e-4,
                      torch.randn(n_in // group, n_out, device=DEV) * 0.01], dim=-1).to(DT).contiguous()
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    for arg in (packed_u8, codes):
        try:
            wp = torch._convert_weight_to_int4pack(arg, 8)
            x = torch.randn(1, n_in, device=DEV, dtype=DT)
            torch._weight_int4pack_mm(x, wp, group, sz)
            return wp, sz, codes
        except Exception as e:  # noqa: BLE001
            err = e
    print(f"  torch int4pack unavailable: {type(err).__name__}: {str(err)[:160]}", flush=True)
    return None


def int4pack_check(wp, sz, codes, n_in, group=128) -> float:
    """Relative error of ``_weight_int4pack_mm`` against (code - 8) * scale + zero (gpt-fast's dequantization)."""
    x = torch.randn(1, n_in, device=DEV, dtype=DT)
    s = sz[..., 0].float().repeat_interleave(group, 0)  # [in, out]
    z = sz[..., 1].float().repeat_interleave(group, 0)
    w = (codes.t().float() - 8) * s + z
    ref = x.float() @ w
    y = torch._weight_int4pack_mm(x, wp, group, sz).float()
    return float((y - ref).norm() / ref.norm())


def read_gbps() -> float:
    a = torch.empty(2**28, dtype=torch.float32, device=DEV).uniform_()
    t = gtime([lambda: a.sum()], reps=20)
    return a.numel() * 4 / (t * 1e-6) / 1e9


def kept_bytes(x, thr, splits, row_bytes_per_out: float) -> float:
    """Bytes of the kept rows: per matrix, the kept fraction x its rows' bytes."""
    keep = (x.float().abs().reshape(1, -1) > thr).float().mean(dim=1)
    sizes = torch.tensor(splits if thr.shape[0] > 1 else [sum(splits)], device=DEV, dtype=torch.float32)
    return float((keep * sizes).sum()) * x.shape[-1] * row_bytes_per_out


SWEEP = [qk.QuantConfig(block_n=bn, block_k=bk, num_warps=w, waves=wv, fast_cvt=f)
         for bn, bk, w, wv, f in ((1024, 16, 4, 4, True), (2048, 16, 4, 4, True), (4096, 16, 4, 4, True),
                                  (4096, 16, 8, 4, True), (2048, 32, 4, 4, True), (2048, 8, 4, 4, True),
                                  (1024, 32, 4, 4, True), (2048, 16, 4, 8, True), (2048, 16, 4, 2, True),
                                  (2048, 16, 4, 4, False), (512, 32, 4, 4, True))]


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="quant_kernels_h100")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="2,4,8")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    read = read_gbps()
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; read {read:.0f} GB/s", flush=True)
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]
    results, sweeps, batch = [], {}, []
    for name, (n_in, splits) in SHAPES.items():
        n_out = sum(splits)
        sp = splits if len(splits) > 1 else [n_out]
        g = torch.Generator(device=DEV).manual_seed(0)
        x = torch.randn(1, n_in, device=DEV, generator=g).to(DT)
        norms = torch.rand(len(splits), n_in, device=DEV, generator=g) + 0.5
        thr = {s: exact_thresholds(x, norms, s) for s in SPARSITIES}
        row = {"shape": name, "K": n_in, "N": n_out}
        # bf16
        W = rotating(lambda: (torch.randn(n_out, n_in, device=DEV) * 0.02).to(DT), n_in * n_out * 2, l2)
        Wt = [w.t().contiguous() for w in W]
        row["bf16_cublas"] = gtime([lambda w=w: F.linear(x, w) for w in W])
        outs = [torch.empty(n_out, device=DEV, dtype=DT) for _ in W]
        for s in SPARSITIES:
            row[f"bf16_{s}"] = gtime([lambda i=i, s=s: K._gemv(x, Wt[i], thr[s], sp, None, out=outs[i]) for i in range(len(W))])
        del W, Wt, outs
        # torch int4 weight-only, group 128
        probe = int4pack(n_in, n_out)
        if probe is not None:
            row["torch_int4_err"] = int4pack_check(*probe, n_in)
            packs = rotating(lambda: int4pack(n_in, n_out)[:2], n_in * n_out // 2, l2)
            row["torch_int4_g128"] = gtime([lambda p=p: torch._weight_int4pack_mm(x, p[0], 128, p[1]) for p in packs])
            for m in rows_list:
                xm = torch.randn(m, n_in, device=DEV).to(DT)
                batch.append({"shape": name, "rows": m, "kind": "torch int4 g128",
                              "us": gtime([lambda p=p: torch._weight_int4pack_mm(xm, p[0], 128, p[1]) for p in packs])})
            del packs
        torch.cuda.empty_cache()
        # ours
        for label, bits, along_in, group, offsets in (("int4", 4, False, 128, True), ("int8", 8, False, 128, False),
                                                      ("int4_in32", 4, True, 32, False)):
            one = random_quant(n_in, n_out, bits, along_in, group, offsets)
            Q = rotating(lambda: random_quant(n_in, n_out, bits, along_in, group, offsets), one.nbytes, l2)
            per_out = one.nbytes / (n_in * n_out)  # bytes per weight, scales and offsets included
            out = [torch.empty(1, n_out, device=DEV, dtype=DT) for _ in Q]
            x2 = x.reshape(1, n_in)

            def timed(s_thr, cfg, rows_x=x2):
                o = [torch.empty(rows_x.shape[0], n_out, device=DEV, dtype=DT) for _ in Q]
                return gtime([lambda i=i: qk._kernel_path(rows_x, Q[i], s_thr, sp, None, o[i], cfg) for i in range(len(Q))])

            cfg = None
            if args.sweep and not along_in:
                tried = []
                for c in SWEEP:
                    try:
                        tried.append((timed(thr[0.5], c), c))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} {label} {c} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                tried.sort(key=lambda t: t[0])
                sweeps[f"{name} {label}"] = [(round(t, 2), c.__dict__) for t, c in tried]
                print(f"  sweep {name} {label}: " + "; ".join(f"{t:.1f}us bn{c.block_n} bk{c.block_k} w{c.num_warps} "
                                                              f"wv{c.waves} f{int(c.fast_cvt)}" for t, c in tried[:4]), flush=True)
                cfg = tried[0][1]
                qk.TUNED[(bits, along_in, n_in, n_out)] = cfg
            for s in (SPARSITIES if not along_in else (0.0, 0.5)):
                t = timed(thr[s], cfg)
                row[f"{label}_{s}"] = t
                row[f"{label}_{s}_kept_gbps"] = kept_bytes(x, thr[s], sp, per_out) / (t * 1e-6) / 1e9
            row[f"{label}_MB"] = one.nbytes / 2**20
            if not along_in:
                for m in rows_list:
                    xm = torch.randn(m, n_in, device=DEV).to(DT)
                    gm = torch.Generator(device=DEV).manual_seed(m)
                    tm = exact_thresholds(xm[:1], norms, 0.5)  # the first row's levels: the rows' union keeps more
                    union = float((xm.float().abs().unsqueeze(1) > tm).any(0).float().mean())
                    dense_thr = torch.full_like(tm, float("-inf"))
                    batch.append({"shape": name, "rows": m, "kind": f"ours {label}", "union_keep": union,
                                  "dense_us": timed(dense_thr, cfg, xm), "gated_0.5_us": timed(tm, cfg, xm)})
                    del gm
            del Q, out
            torch.cuda.empty_cache()
        results.append(row)
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float) and "gbps" not in k), flush=True)

    lines = [f"Device: {props.name}; torch {torch.__version__}. Llama-3-8B shapes, batch 1, GPU us per call from CUDA-graph "
             f"replays, weights rotated over > 4x the L2 ({l2 / 2**20:.0f} MiB). Read bandwidth (sum over 1 GiB): {read:.0f} GB/s.",
             "int4: asymmetric, group 128 along the outputs (scale + offset fp16); int8: symmetric, group 128; "
             "int4_in32: symmetric, groups of 32 along the inputs (GGUF Q4_0's shape). Sparsity = channels dropped per matrix.",
             "",
             "| matrix | bf16 cuBLAS | bf16 ours 0 | bf16 0.5 | bf16 0.65 | torch int4 g128 | int4 0 | int4 0.5 | int4 0.65 "
             "| int8 0 | int8 0.5 | int8 0.65 | int4_in32 0 | int4_in32 0.5 | int4 0.5 kept GB/s (% read) | int8 0.5 kept GB/s (% read) |",
             "|---|" + "---|" * 16]
    f = lambda r, k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
    for r in results:
        cells = [f(r, k) for k in ("bf16_cublas", "bf16_0.0", "bf16_0.5", "bf16_0.65", "torch_int4_g128", "int4_0.0", "int4_0.5",
                                   "int4_0.65", "int8_0.0", "int8_0.5", "int8_0.65", "int4_in32_0.0", "int4_in32_0.5")]
        bw = [f"{r[k]:.0f} ({r[k] / read:.0%})" for k in ("int4_0.5_kept_gbps", "int8_0.5_kept_gbps")]
        lines.append(f"| {r['shape']} {r['K']}x{r['N']} | " + " | ".join(cells + bw) + " |")
    lines.append("")
    tot = {k: sum(r.get(k, 0.0) for r in results) for k in results[0] if isinstance(results[0][k], float)}
    lines.append("Sum over one layer's four matrices (us): " + ", ".join(
        f"{k} {tot[k]:.1f}" for k in ("bf16_cublas", "bf16_0.5", "torch_int4_g128", "int4_0.0", "int4_0.5", "int4_0.65",
                                      "int8_0.0", "int8_0.5") if k in tot))
    if "torch_int4_g128" in tot:
        base = min(tot["torch_int4_g128"], tot["int4_0.0"])
        lines.append(f"Per layer: int4 0.5 is {base / tot['int4_0.5']:.2f}x dense int4 (the faster of torch's and ours at 0), "
                     f"int4 0.65 {base / tot['int4_0.65']:.2f}x; int8 0.5 is {tot['int8_0.0'] / tot['int8_0.5']:.2f}x our int8 "
                     f"dense; int4 0.5 is {tot['bf16_0.0'] / tot['int4_0.5']:.2f}x our bf16 dense.")
    if "torch_int4_err" in results[0]:
        lines.append(f"torch int4 check: relative error vs (code - 8) * scale + zero: {results[0]['torch_int4_err']:.1e}")
    if batch:
        lines += ["", "A few rows per step (us): ours gated at 0.5 (first row's thresholds; union of the rows' masks) vs "
                  "the same kernel dense, and torch's int4 GEMM", "", "| matrix | rows | kind | union keep | dense | gated 0.5 |",
                  "|---|---|---|---|---|---|"]
        for b in batch:
            if "us" in b:
                lines.append(f"| {b['shape']} | {b['rows']} | {b['kind']} | | {b['us']:.1f} | |")
            else:
                lines.append(f"| {b['shape']} | {b['rows']} | {b['kind']} | {b['union_keep']:.2f} | {b['dense_us']:.1f} "
                             f"| {b['gated_0.5_us']:.1f} |")
    if sweeps:
        lines += ["", "Sweep at 0.5 (fastest first): " + "; ".join(
            f"{k}: " + ", ".join(f"{t}us bn{c['block_n']} bk{c['block_k']} w{c['num_warps']} wv{c['waves']} f{int(c['fast_cvt'])}"
                                 for t, c in v[:3]) for k, v in sweeps.items())]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as fh:
        json.dump({"device": props.name, "read_gbps": read, "rows": results, "batch": batch, "sweeps": sweeps}, fh, indent=1)
    print(text, flush=True)


if __name__ == "__main__":
    main()
