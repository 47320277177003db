"""down_proj at Llama-3-8B shape on the GPU: the GLU launch (activation inside, `gated_linear(..., glu=1)`) vs an elementwise
kernel + the plain launch, CUDA-graph timings per call (`python benchmarks/glu_micro.py`, writes $OUT/glu_micro.json)."""
import torch, torch.nn.functional as F, statistics, json, os
from wina_convert.runtime.kernels import launch as K
from wina_convert.runtime.kernels.configs import Config, TUNED_GEMV
torch.manual_seed(0)
dev = "cuda"; Kin, N = 14336, 4096
gu = (torch.randn(2 * Kin, device=dev) * 2).bfloat16()
w = (torch.randn(Kin, N, device=dev) / Kin**0.5).bfloat16()
norms = torch.rand(1, Kin, device=dev) + 0.25
x = K.glu_input(gu, 1)
act = torch.compile(lambda t: K.glu_input(t, 1))
act(gu); torch.cuda.synchronize()
base = TUNED_GEMV[(Kin, N)]
cfgs = {"tuned": base, "prefetch": Config(**{**base.__dict__, "prefetch": True}),
        "pipe": Config(**{**base.__dict__, "pipe": True, "acc1d": False}),
        "bk8": Config(**{**base.__dict__, "block_k": 8}), "bk8pf": Config(**{**base.__dict__, "block_k": 8, "prefetch": True})}
def timeit(fn, reps=20, iters=30):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(ts)
out = {}
for s in (0.4, 0.5, 0.65):
    t = torch.quantile((x.float().abs() * norms).reshape(-1)[:1 << 24], s)
    thr = (t / norms).float()
    ref = K._gemv(x, w, thr, [N], None)
    row = {"act only": timeit(lambda: act(gu)), "plain gemv": timeit(lambda: K._gemv(x, w, thr, [N], None)),
           "act + plain gemv": timeit(lambda: K._gemv(act(gu), w, thr, [N], None))}
    for name, cfg in cfgs.items():
        y = K._gemv(gu, w, thr, [N], None, cfg=cfg, glu=1)
        err = float((y.double() - ref.double()).norm() / ref.double().norm())
        row[f"glu {name}"] = timeit(lambda: K._gemv(gu, w, thr, [N], None, cfg=cfg, glu=1))
        row[f"glu {name} err"] = err
        row[f"plain {name}"] = timeit(lambda: K._gemv(x, w, thr, [N], None, cfg=cfg))
    out[s] = row
    print(s, {k: round(v, 2) if "err" not in k else f"{v:.1e}" for k, v in row.items()}, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "glu_micro.json"), "w"), indent=1)
