"""Benchmark of the WINA gated-linear triton kernels on Llama-3-8B shapes (bf16, one GPU).

    python benchmarks/bench_kernels.py [--sweep] [--out DIR]

Prints, per matrix: cuBLAS dense time, the gated kernel's time at sparsity 0 / 0.4 / 0.5 / 0.65, the
achieved bandwidth over the bytes that must be read ((1-s) x weight bytes), the speedup over dense
and its fraction of the physical limit 1/(1-s); the device-to-device copy bandwidth (the roofline);
the batch > 1 comparison (sparse kernel vs masked dense cuBLAS); a whole decoder layer (qkv, o,
gate_up, down) eager and in one CUDA graph. ``--sweep`` first tunes the tile configs per shape.
The compact table comes last and goes to DIR/kernels_h100.txt (+ kernels_h100.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from wina_convert.runtime.kernels import launch as K


DEV = "cuda"
DT = torch.bfloat16
HID, INTER = 4096, 14336
# name: (in, splits)
SHAPES = {
    "qkv": (HID, [4096, 1024, 1024]),
    "o": (HID, [4096]),
    "gate_up": (HID, [INTER, INTER]),
    "down": (INTER, [HID]),
}
SPARSITIES = [0.0, 0.4, 0.5, 0.65]
L2_BYTES = 50 * 2**20


def bench(fn, warmup=5, rep=25):
    from triton.testing import do_bench  # triton only on the GPU machine: --help works without it

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # microseconds


def gtime(calls, reps=15):
    """GPU time per call (us): every call (each on its own rotating buffer) captured into one CUDA graph,
    the graph replayed ``reps`` times; the median replay over len(calls). Host launch cost is excluded."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(ts)


def exact_thresholds(x: torch.Tensor, norms: torch.Tensor, s: float) -> torch.Tensor:
    """Per-channel thresholds t / c with t the score quantile, so that exactly round(s * in) channels drop."""
    n_mats, n_in = norms.shape
    if s <= 0:
        return torch.zeros(n_mats, n_in, device=DEV)
    k = int(round(s * n_in))
    scores = x.float().abs().reshape(1, n_in) * norms  # [mats, in]
    srt = scores.sort(dim=1).values
    t = (srt[:, k - 1] + srt[:, k]) / 2  # between the k-th and (k+1)-th smallest
    return (t[:, None] / norms).float()


def achieved(x, thr):
    return float((~(x.float().abs().reshape(1, -1) > thr)).float().mean())


class Case:
    """Rotating weight buffers (more bytes than L2 holds) for one shape."""

    def __init__(self, name, n_in, splits, min_bytes=4 * L2_BYTES):
        self.name, self.n_in, self.splits = name, n_in, splits
        self.n_out = sum(splits)
        self.wbytes = self.n_in * self.n_out * 2
        n_buf = max(2, math.ceil(min_bytes / self.wbytes))
        g = torch.Generator(device=DEV).manual_seed(0)
        self.W = [(torch.randn(self.n_out, n_in, device=DEV, generator=g) * 0.02).to(DT) for _ in range(n_buf)]
        self.Wt = [w.t().contiguous() for w in self.W]
        self.x = torch.randn(1, n_in, device=DEV, generator=g).to(DT)
        self.norms = torch.rand(len(splits), n_in, device=DEV, generator=g) + 0.5
        self.i = 0

    def nxt(self):
        self.i = (self.i + 1) % len(self.W)
        return self.i

    def thr(self, s):
        return exact_thresholds(self.x, self.norms, s)

    def t_dense(self):
        return gtime([lambda i=i: F.linear(self.x, self.W[i]) for i in range(len(self.W))])

    def t_dense_t(self):
        return gtime([lambda i=i: torch.matmul(self.x, self.Wt[i]) for i in range(len(self.W))])

    def t_gated(self, s, cfg=None, thr=None):
        thr = self.thr(s) if thr is None else thr
        sp = self.splits if len(self.splits) > 1 else None
        outs = [torch.empty(self.n_out, device=DEV, dtype=DT) for _ in self.W]
        return gtime([lambda i=i: K._gemv(self.x, self.Wt[i], thr, sp, None, out=outs[i], cfg=cfg) for i in range(len(self.W))])

    def needed_bytes(self, thr):
        keep = (self.x.float().abs().reshape(1, -1) > thr).float().mean(dim=1)  # [mats]
        sizes = torch.tensor(self.splits if thr.shape[0] > 1 else [self.n_out], device=DEV, dtype=torch.float32)
        return float((keep * sizes).sum()) * self.n_in * 2


def copy_bandwidth():
    a = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    a.random_(0, 255)
    t = bench(lambda: b.copy_(a), warmup=10, rep=100)
    return 2 * a.numel() / (t * 1e-6) / 1e9  # GB/s, read + write


def sweep(cases, log):
    tiles = []
    for bn in (128, 256, 512, 1024):
        for bk in (8, 16, 32, 64):
            for nw in (4, 8):
                per_thread = bn * bk / (32 * nw)
                if 8 <= per_thread <= 128:
                    tiles.append((bn, bk, nw))
    fmt = lambda t, c_: (f"{t:.1f}us bn{c_.block_n} bk{c_.block_k} w{c_.num_warps} st{c_.num_stages} wv{c_.waves} "
                         f"pf{int(c_.prefetch)} pipe{int(c_.pipe)}")
    best = {}
    for name, c in cases.items():
        thr = {s: c.thr(s) for s in (0.0, 0.4, 0.5, 0.65)}
        res = []
        for bn, bk, nw in tiles:
            for pf in (False, True):
                cfg = K.Config(block_n=bn, block_k=bk, num_warps=nw, num_stages=1, waves=8, prefetch=pf)
                try:
                    res.append((c.t_gated(0.5, cfg, thr[0.5]), cfg))
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
        res.sort(key=lambda r: r[0])
        log(f"[sweep A] {name}: " + "; ".join(fmt(*r) for r in res[:6]))
        res2 = list(res[:6])
        for _, cfg in res[:6]:
            for waves in (2, 4, 16, 32):
                c2 = K.Config(**{**cfg.__dict__, "waves": waves})
                res2.append((c.t_gated(0.5, c2, thr[0.5]), c2))
            c3 = K.Config(**{**cfg.__dict__, "num_stages": 2})
            res2.append((c.t_gated(0.5, c3, thr[0.5]), c3))
            c4 = K.Config(**{**cfg.__dict__, "pipe": True, "prefetch": False})  # two weight tiles in flight
            res2.append((c.t_gated(0.5, c4, thr[0.5]), c4))
        res2.sort(key=lambda r: r[0])
        log(f"[sweep B] {name}: " + "; ".join(fmt(*r) for r in res2[:6]))
        res3 = []
        for t5, cfg in res2[:6]:
            ts = {s: (t5 if s == 0.5 else c.t_gated(s, cfg, thr[s])) for s in (0.0, 0.4, 0.5, 0.65)}
            res3.append((ts[0.4] + ts[0.5] + ts[0.65] + 0.5 * ts[0.0], cfg, ts))
        res3.sort(key=lambda r: r[0])
        for score, cfg, ts in res3:
            log(f"[sweep C] {name}: score {score:.1f} " + fmt(ts[0.5], cfg) + " | " + " ".join(f"s{s}:{t:.1f}" for s, t in ts.items()))
        best[name] = res3[0][1]
        K.TUNED_GEMV[(c.n_in, c.n_out)] = res3[0][1]
    return best


def host_overhead(log):
    """Host time of one call when the GPU is not the bottleneck (tiny matrix, 3000 calls, no sync)."""
    x = torch.randn(1, 512, device=DEV).to(DT)
    wt = torch.randn(512, 512, device=DEV).to(DT)
    w = wt.t().contiguous()
    thr = torch.full((1, 512), 0.5, device=DEV)
    res = {}

    def per_call(fn, n=3000):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6

    res["torch_add"] = per_call(lambda: x.add(1))
    res["F_linear"] = per_call(lambda: F.linear(x, w))
    res["gated_fast"] = per_call(lambda: K.gated_linear(x, wt, thr))
    old = K._FAST_LAUNCH
    K._FAST_LAUNCH = False
    res["gated_jit"] = per_call(lambda: K.gated_linear(x, wt, thr))
    K._FAST_LAUNCH = old
    log("[host] us per call: " + ", ".join(f"{k}={v:.1f}" for k, v in res.items()))
    return res


def batch_study(cases, log, rows_list=(2, 4, 8, 16, 64), sparsities=(0.5, 0.65)):
    out = []
    for name, c in cases.items():
        sp = c.splits if len(c.splits) > 1 else None
        g = torch.Generator(device=DEV).manual_seed(1)
        for rows in rows_list:
            x = torch.randn(rows, c.n_in, device=DEV, generator=g).to(DT)
            nb = range(len(c.W))
            t_plain = gtime([lambda i=i: F.linear(x, c.W[i]) for i in nb])
            for s in sparsities:
                # per-token scores, thresholds from the pooled quantile
                scores = x.float().abs()[None] * c.norms[:, None, :]
                t = torch.quantile(scores.reshape(len(c.splits), -1), s, dim=1)
                thr = (t[:, None] / c.norms).float()
                keep_any = float((x.float().abs()[None] > thr[:, None]).any(dim=1).float().mean())
                t_dense = gtime([lambda i=i: K._dense_masked(x, c.Wt[i], thr, c.splits, None) for i in nb])
                t_sparse = gtime([lambda i=i: K._gemm_sparse(x, c.Wt[i], thr, sp, None) for i in nb])
                row = dict(shape=name, rows=rows, s=s, union_keep=keep_any, t_plain_linear=t_plain,
                           t_masked_dense=t_dense, t_sparse=t_sparse)
                out.append(row)
                log(f"[batch] {name:8s} B={rows:3d} s={s:.2f} union_keep={keep_any:.2f} plain={t_plain:7.1f}us "
                    f"masked_dense={t_dense:7.1f}us sparse={t_sparse:7.1f}us")
    return out


def layer_study(log, n_layers=6):
    """Per-layer decode time: qkv (fused), o, gate_up (fused), down; dense vs gated; eager and graphed."""
    g = torch.Generator(device=DEV).manual_seed(2)
    names = ["qkv", "o", "gate_up", "down"]
    layers = []
    for _ in range(n_layers):
        lay = {}
        for n in names:
            n_in, splits = SHAPES[n]
            w = (torch.randn(sum(splits), n_in, device=DEV, generator=g) * 0.02).to(DT)
            lay[n] = (w, w.t().contiguous(), splits)
        layers.append(lay)
    xs = {HID: torch.randn(1, HID, device=DEV, generator=g).to(DT), INTER: torch.randn(1, INTER, device=DEV, generator=g).to(DT)}
    norms = {n: torch.rand(len(SHAPES[n][1]), SHAPES[n][0], device=DEV, generator=g) + 0.5 for n in names}

    def dense_all():
        for lay in layers:
            for n in names:
                F.linear(xs[SHAPES[n][0]], lay[n][0])

    def gated_all_fn(s):
        thr = {n: exact_thresholds(xs[SHAPES[n][0]], norms[n], s) for n in names}

        def run():
            for lay in layers:
                for n in names:
                    _, wt, splits = lay[n]
                    K.gated_linear(xs[SHAPES[n][0]], wt, thr[n], splits if len(splits) > 1 else None)
        return run

    def timed_loop(fn, iters=20):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / iters / n_layers)
        return statistics.median(ts)

    def graphed(fn):
        fn()
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm on the capture stream too
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        with torch.cuda.graph(gr):
            fn()
        return lambda: gr.replay()

    res = {}
    variants = [("dense", dense_all)] + [(f"gated s={s}", gated_all_fn(s)) for s in (0.0, 0.4, 0.5, 0.65)]
    for label, fn in variants:
        eager = timed_loop(fn)
        g_fn = graphed(fn)
        graph = timed_loop(g_fn)
        res[label] = dict(eager_us=eager, graph_us=graph)
        log(f"[layer] {label:14s} eager {eager:7.1f} us/layer   cuda-graph {graph:7.1f} us/layer")
    # host cost of one gated_linear call (python + triton launch), GPU not the bottleneck
    n_in, splits = SHAPES["o"]
    w = layers[0]["o"][1]
    thr = exact_thresholds(xs[HID], norms["o"], 0.5)
    K.gated_linear(xs[HID], w, thr)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        K.gated_linear(xs[HID], w, thr)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    res["host_us_per_call"] = (t1 - t0) / 2000 * 1e6
    log(f"[layer] host time per gated_linear call (launch-bound loop): {res['host_us_per_call']:.1f} us")
    return res


def main():  # noqa: C901
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import triton

    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth()
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    result = dict(device=props.name, copy_GBps=bw, shapes={})
    result["host"] = host_overhead(log)
    cases = {n: Case(n, *SHAPES[n]) for n in SHAPES}
    if args.sweep:
        best = sweep(cases, log)
        result["tuned"] = {n: c.__dict__ for n, c in best.items()}
    table = []
    for name, c in cases.items():
        cfg = K.TUNED_GEMV.get((c.n_in, c.n_out), K.DEFAULT_GEMV)
        td = c.t_dense()
        tdt = c.t_dense_t()
        row = dict(shape=name, K=c.n_in, N=c.n_out, MB=c.wbytes / 2**20, dense_us=td, dense_wt_us=tdt,
                   dense_GBps=c.wbytes / td / 1e3, cfg=cfg.__dict__, gated={})
        for s in SPARSITIES + [0.9]:
            thr = c.thr(s)
            t = c.t_gated(s, cfg, thr)
            need = c.needed_bytes(thr)
            sp = td / t
            limit = c.wbytes / need
            row["gated"][s] = dict(us=t, achieved_s=achieved(c.x, thr), GBps=need / t / 1e3, speedup=sp, frac_limit=sp / limit)
        table.append(row)
        result["shapes"][name] = row
        log(f"[matrix] {name}: dense {td:.1f}us ({row['dense_GBps']:.0f} GB/s), dense on W^T {tdt:.1f}us, " + ", ".join(
            f"s={s}: {v['us']:.1f}us {v['GBps']:.0f}GB/s x{v['speedup']:.2f} ({v['frac_limit']:.0%} of limit)" for s, v in row["gated"].items()))
    if not args.no_batch:
        result["batch"] = batch_study(cases, log)
    del cases
    torch.cuda.empty_cache()
    result["layer"] = layer_study(log)

    # compact table, last
    out = ["", f"== WINA gated GEMV, bf16, batch 1, {props.name}; copy roofline {bw:.0f} GB/s (r+w); GPU us per call from CUDA-graph replays ==",
           f"{'matrix':8s} {'KxN':>12s} {'MiB':>5s} {'dense us':>8s} {'GB/s':>5s} | " + " | ".join(f"s={s:<4} us  GB/s  xdense %lim" for s in SPARSITIES)]
    for row in table:
        cells = []
        for s in SPARSITIES:
            v = row["gated"][s]
            cells.append(f"{v['us']:7.1f} {v['GBps']:5.0f} {v['speedup']:6.2f} {v['frac_limit']*100:4.0f}")
        out.append(f"{row['shape']:8s} {row['K']:>5d}x{row['N']:<6d} {row['MB']:5.0f} {row['dense_us']:8.1f} {row['dense_GBps']:5.0f} | " + " | ".join(cells))
    lay = result["layer"]
    d = lay["dense"]
    out.append(f"layer (qkv+o+gate_up+down): dense eager {d['eager_us']:.1f} us, graph {d['graph_us']:.1f} us")
    for s in (0.0, 0.4, 0.5, 0.65):
        v = lay[f"gated s={s}"]
        out.append(f"  gated s={s:<4}: eager {v['eager_us']:.1f} us (x{d['eager_us']/v['eager_us']:.2f}), graph {v['graph_us']:.1f} us (x{d['graph_us']/v['graph_us']:.2f})")
    out.append(f"  host time per gated_linear call: {lay['host_us_per_call']:.1f} us; small-matrix host us/call: "
               + ", ".join(f"{k}={v:.1f}" for k, v in result["host"].items()))
    out.append("tuned configs: " + "; ".join(f"{r['shape']}: bn{r['cfg']['block_n']} bk{r['cfg']['block_k']} w{r['cfg']['num_warps']} "
                                             f"st{r['cfg']['num_stages']} wv{r['cfg']['waves']} pf{int(r['cfg']['prefetch'])} pipe{int(r['cfg'].get('pipe', False))}"
                                             for r in table))
    if "batch" in result:
        out.append("batch > 1 (us): shape B s | plain F.linear | masked dense | sparse kernel")
        for r in result["batch"]:
            out.append(f"  {r['shape']:8s} B={r['rows']:<3d} s={r['s']:.2f} keep_any={r['union_keep']:.2f} | {r['t_plain_linear']:7.1f} | {r['t_masked_dense']:7.1f} | {r['t_sparse']:7.1f}")
    for line in out:
        log(line)
    with open(os.path.join(args.out, "kernels_h100.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "kernels_h100.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
