"""The quantized rows of benchmarks/bench_decode.py: a loaded model's gated linears quantized in place
(``quant.quantize_rtn`` into ``gl.quant``, bound to the quantized kernels), and the dense int4 baseline
(torch's ``_weight_int4pack_mm``, group 128, gpt-fast's and torchao's weight-only path, swapped in for every
linear including the head). Both are timed by the same decode loop as the float rows (static KV cache, the
``torch.compile``'d step recorded in one CUDA graph per token)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from wina_convert.arch import adapter_for
from wina_convert.evaluate import bench as B
from wina_convert.quant import quantize_rtn
from wina_convert.runtime.graphs import greedy
from wina_convert.runtime.kernels import quant as qk
from wina_convert.runtime.kernels.hook import bind_kernels, force_kernels, input_groups
from wina_convert.runtime.modules import GatedLinear

GROUP = 128


class QuantHead(nn.Module):
    """A dense linear over a ``QuantizedWeight`` through the quantized GEMV (thresholds ``-inf``)."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.quant = quantize_rtn(linear.weight.detach(), bits, GROUP)
        self.out_features = linear.out_features
        self.register_buffer("thr", torch.full((1, linear.in_features), float("-inf"), device=linear.weight.device))

    def forward(self, x):
        return qk.quant_gated_linear_op(x, self.thr, self.quant, [self.out_features])


class Int4PackLinear(nn.Module):
    """gpt-fast's ``WeightOnlyInt4Linear``: asymmetric int4 in groups of 128 inputs, torch's tinygemm kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-6)
        codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + scale * 8
        self.sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [k/G, n, 2]
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        try:
            self.wp = torch._convert_weight_to_int4pack(packed, 8)
        except Exception:  # an older layout: int32 codes
            self.wp = torch._convert_weight_to_int4pack(codes, 8)
        self.bias = bias
        self.out_features = n

    def forward(self, x):
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.wp, GROUP, self.sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_model(model, bits: int) -> dict:
    """Every gated linear's weight into ``gl.quant`` (int4 asymmetric / int8 symmetric, groups of 128 outputs),
    kernels rebound; the head through ``QuantHead``. Returns the quantized bytes by kind."""
    control = model.wina
    with torch.no_grad():
        for gate in control.gates.values():
            gate.quant = quantize_rtn(gate.weight, bits, GROUP)
    adapter = adapter_for(model.config.model_type)
    bind_kernels(control, input_groups(adapter, model.config.num_hidden_layers))
    head = model.get_output_embeddings()
    qhead = QuantHead(head, bits)
    model.set_output_embeddings(qhead)
    control.context.epoch += 1
    return {"gated": sum(g.quant.nbytes for g in control.gates.values()), "rest": qhead.quant.nbytes + other_bytes(model)}


def swap_int4pack(model) -> int:
    """Every linear of the layers (the gated ones, whatever their kernels) and the head -> ``Int4PackLinear``.
    Returns the int4 bytes (codes + scales and zeros)."""
    total = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (GatedLinear, nn.Linear)) and not isinstance(child, Int4PackLinear):
                if "shortcut" in child_name:
                    continue
                new = Int4PackLinear(child.weight, child.bias)
                total += new.wp.numel() * new.wp.element_size() + new.sz.numel() * new.sz.element_size()
                setattr(module, child_name, new)
    model.wina.context.epoch += 1
    return total


def time_rows(model, levels, tokens: int, prompt_tokens: int, quant_bytes: dict | None, seed: int = 0) -> dict:
    """The bench loop of ``evaluate.bench`` for the given sparsities (None: as the model is, no gates),
    with bytes per token counted from the quantized weights."""
    control = model.wina
    dev = next(model.parameters()).device
    runner = getattr(model, "wina_decode", None)
    if runner is not None:
        runner.compile = True
    from transformers import StaticCache

    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
    cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + tokens + 1)
    control.set_counting(False)
    rows = []
    read = B._read_gbps(dev) if dev.type == "cuda" else None
    for s in levels:
        t0 = time.perf_counter()
        if s is not None:
            control.set_sparsity(s)
            if s == 0:
                force_kernels(control)
        greedy(model, prompt, min(tokens, 4), cache=cache)
        times, out = B._timed_decode(model, prompt, tokens, cache, dev)
        row = {"sparsity": s, "tokens_per_s": (tokens - 1) / sum(times), "latency_ms": statistics.median(times) * 1e3,
               "wall_s": time.perf_counter() - t0}
        if s is not None and s > 0:
            row["achieved_sparsity"], _, _ = B._achieved(model, control, prompt, out)
            control.set_counting(False)
        else:
            row["achieved_sparsity"] = 0.0
        if quant_bytes is not None and read:
            per_token = quant_bytes["gated"] * (1 - row["achieved_sparsity"]) + quant_bytes["rest"] + _kv_bytes(cache)
            row["bytes_per_token"] = per_token
            row["byte_limit_tokens_per_s"] = read * 1e9 / per_token
            row["fraction_of_byte_limit"] = row["tokens_per_s"] / row["byte_limit_tokens_per_s"]
        rows.append(row)
        print(f"    s={s}: {row['tokens_per_s']:.1f} tok/s ({row['wall_s']:.0f} s)", flush=True)
    return {"rows": rows, "read_gbps": read}


def _kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def other_bytes(model) -> int:
    """What a step reads besides the linears and the KV cache: one embedding row and the norms."""
    emb = model.get_input_embeddings().weight
    return emb.shape[1] * emb.element_size() + sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                                    if "norm" in n)
