"""Prototype (2026-12-02, lost): downstream-aware WINA column weights (gate/up through silu and down_proj, v through
o_proj, q/k through the other side's second moments), thresholds recalibrated at each matrix's allocated sparsity.
Usage: python benchmarks/prototypes/sensitivity_scores.py CHECKPOINT SPARSITY [CALIBRATION_WINDOWS]"""
import sys, time, torch
import torch.nn.functional as F
import wina_convert as w
from wina_convert.calibration.text import read_texts, token_windows, heldout_texts, eval_windows
from wina_convert.evaluate.perplexity import perplexity
from transformers import AutoTokenizer
torch.manual_seed(0)
ckpt = sys.argv[1]; s = float(sys.argv[2]); ncal = int(sys.argv[3]) if len(sys.argv) > 3 else 8
variants = sys.argv[4].split(",") if len(sys.argv) > 4 else ["colnorm", "mlp", "mlp+v", "all"]
net = w.load(ckpt, sparsity=0, device="cpu", dtype="float32")
tok = AutoTokenizer.from_pretrained(ckpt)
ctl = net.wina; ctl.set_gate_prefill(True); ctl.set_counting(False)
cfg = net.config
H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
hd = getattr(cfg, "head_dim", None) or D // H
cal = token_windows(tok, read_texts(None)[0], ncal, 512, 0)
ev = eval_windows(tok, heldout_texts(None)[0], 512, 8192)
layers = net.model.layers
# ---- dense pass: output statistics
ctl.set_sparsity(0.0)
st = {}
def out_hook(key):
    def f(mod, inp, out):
        y = out.detach().reshape(-1, out.shape[-1]).double()
        st.setdefault(key, []).append(y)
    return f
hs = []
for l, layer in enumerate(layers):
    hs += [layer.mlp.gate_proj.register_forward_hook(out_hook((l, "g"))), layer.mlp.up_proj.register_forward_hook(out_hook((l, "u"))),
           layer.self_attn.q_proj.register_forward_hook(out_hook((l, "q"))), layer.self_attn.k_proj.register_forward_hook(out_hook((l, "k")))]
with torch.no_grad():
    for i in range(0, len(cal), 4): net(cal[i:i+4])
for h in hs: h.remove()
st = {k: torch.cat(v) for k, v in st.items()}
def weights(l, which):
    layer = layers[l]; mlp, att = layer.mlp, layer.self_attn
    out = {}
    g, u = st[(l, "g")], st[(l, "u")]
    sg = torch.sigmoid(g); silu = g * sg; dsilu = sg * (1 + g * (1 - sg))
    ea2 = ((dsilu * u) ** 2).mean(0); eb2 = (silu ** 2).mean(0)
    d2 = mlp.down_proj.weight.double().pow(2).sum(0)  # [I]
    if "mlp" in which:
        out[f"model.layers.{l}.mlp.gate_proj"] = ((d2 * ea2)[:, None] * mlp.gate_proj.weight.double() ** 2).sum(0).sqrt()
        out[f"model.layers.{l}.mlp.up_proj"] = ((d2 * eb2)[:, None] * mlp.up_proj.weight.double() ** 2).sum(0).sqrt()
    wo2 = att.o_proj.weight.double().pow(2).sum(0).reshape(G, H // G, hd).sum(1).reshape(-1)  # [G*hd]
    if "v" in which:
        out[f"model.layers.{l}.self_attn.v_proj"] = (wo2[:, None] * att.v_proj.weight.double() ** 2).sum(0).sqrt()
    if "qk" in which:
        eq2 = (st[(l, "q")] ** 2).mean(0).reshape(G, H // G, hd)
        ek2 = (st[(l, "k")] ** 2).mean(0).reshape(G, hd)
        # rotary mixes channel pairs (j, j + hd/2): average each pair
        pair = lambda t: (t + t.roll(hd // 2, -1)) / 2
        eq2, ek2 = pair(eq2), pair(ek2)
        wq = ek2[:, None, :].expand(G, H // G, hd).reshape(-1)
        wk = eq2.sum(1).reshape(-1)
        out[f"model.layers.{l}.self_attn.q_proj"] = (wq[:, None] * att.q_proj.weight.double() ** 2).sum(0).sqrt()
        out[f"model.layers.{l}.self_attn.k_proj"] = (wk[:, None] * att.k_proj.weight.double() ** 2).sum(0).sqrt()
    return out
# ---- sparse pass at the checkpoint's thresholds: inputs of each gate (subsample)
ctl.set_sparsity(s)
sp = ctl.gate_sparsities(s)
xs = {}
def in_hook(name):
    def f(mod, inp):
        x = inp[0].detach().reshape(-1, mod.in_features)
        xs.setdefault(name, []).append(x[torch.randperm(x.shape[0])[:512]])
    return f
hs = [g.register_forward_pre_hook(in_hook(n)) for n, g in ctl.gates.items()]
with torch.no_grad():
    for i in range(0, len(cal), 4): net(cal[i:i+4])
for h in hs: h.remove()
xs = {k: torch.cat(v).double() for k, v in xs.items()}
base = perplexity(net, ev); print(f"checkpoint thresholds: {base:.3f}", flush=True)
def apply(cw):
    for name, gate in ctl.gates.items():
        c = cw.get(name, ctl.tables[name].column_norms[0].double())
        scores = (xs[name].abs() * c).reshape(-1)
        t = torch.quantile(scores.float(), float(sp[name][0]))
        gate.set_thresholds((t / c.clamp_min(1e-30)).float()[None])
for v in variants:
    cw = {}
    if v != "colnorm":
        parts = {"mlp": ["mlp"], "mlp+v": ["mlp", "v"], "all": ["mlp", "v", "qk"], "v": ["v"], "qk": ["qk"]}[v]
        for l in range(len(layers)): cw.update(weights(l, parts))
    apply(cw)
    ctl.reset_stats(); ctl.set_counting(True)
    r = perplexity(net, ev); stt = ctl.stats(); ctl.set_counting(False)
    print(f"{v}: ppl {r:.3f} sparsity {stt['sparsity']:.3f} kept_bytes {stt['kept_bytes_fraction']:.3f}", flush=True)
