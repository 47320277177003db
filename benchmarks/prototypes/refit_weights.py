"""Prototype (2026-12-02, lost): refit each gated matrix to its sparse input, W' = (W E[x m^T] + lam W)(E[m m^T] + lam I)^-1,
from one pass over 16 x 512 calibration tokens of the sparse model; held-out perplexity at the checkpoint's sparsity.
Usage: python benchmarks/prototypes/refit_weights.py CHECKPOINT SPARSITY"""
import sys, time, torch
import wina_convert as w
from wina_convert.calibration.text import read_texts, token_windows, heldout_texts, eval_windows
from wina_convert.evaluate.perplexity import perplexity
from wina_convert.runtime.modules import GatedLinear
from transformers import AutoTokenizer
torch.manual_seed(0)
ckpt = sys.argv[1]; s = float(sys.argv[2]); ridge = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
ncal = int(sys.argv[4]) if len(sys.argv) > 4 else 16
net = w.load(ckpt, sparsity=0, device="cpu", dtype="float32")
tok = AutoTokenizer.from_pretrained(ckpt)
ctl = net.wina
ctl.set_gate_prefill(True)
cal = token_windows(tok, read_texts(None)[0], ncal, 512, 0)
ev = eval_windows(tok, heldout_texts(None)[0], 512, 8192)
ctl.set_sparsity(0.0); dense = perplexity(net, ev); print("dense", dense, flush=True)
ctl.set_sparsity(s); ctl.set_counting(False) if hasattr(ctl, "set_counting") else None
base = perplexity(net, ev); print("sparse", base, flush=True)
gates = {n: g for n, g in net.named_modules() if isinstance(g, GatedLinear)}
stats = {}
def hook(mod, inp):
    x = inp[0].detach().reshape(-1, mod.in_features).double()
    keep = x.abs().unsqueeze(-2) > mod.thresholds.double()  # [T, P, in]
    st = stats.setdefault(mod, [torch.zeros(len(mod.splits), mod.in_features, mod.in_features, dtype=torch.float64) for _ in range(2)])
    for p in range(len(mod.splits)):
        m = x * keep[:, p]
        st[0][p] += x.T @ m  # sum x m^T
        st[1][p] += m.T @ m
hs = [g.register_forward_pre_hook(hook) for g in gates.values()]
t = time.time()
with torch.no_grad():
    for i in range(0, len(cal), 4):
        net(cal[i:i+4])
for h in hs: h.remove()
print("collected", time.time() - t, flush=True)
orig = {g: g.weight.data.clone() for g in gates.values()}
for lam in (1e-2, 1e-1, 1.0):
  with torch.no_grad():
    for g, (cxm, cmm) in stats.items():
        start = 0
        for p, size in enumerate(g.splits):
            W = orig[g][start:start+size].double()
            C = cmm[p].clone(); d = C.diagonal().mean()
            C += lam * d * torch.eye(C.shape[0], dtype=C.dtype)
            Wn = torch.linalg.solve(C, cxm[p].T @ W.T + lam * d * W.T).T
            g.weight.data[start:start+size] = Wn.float()
            start += size
  r = perplexity(net, ev); print(f"refit-to-W s={s} lam={lam}: {r:.3f} (base {base:.3f})", flush=True)
