"""``wina bench``: decode speed of a WINA checkpoint, dense vs sparse, in the same runtime.

Batch-1 decode reads every weight once per token, so its speed is set by bytes: a token costs
``dense_bytes`` (every parameter, the embedding as one row, the static KV cache) dense, and at sparsity
``s`` the skipped weight columns are never read. The physical limit on the speedup is
``dense_bytes / sparse_bytes`` (from the weights and the sparsity actually achieved, measured on the
decoded tokens), and the achieved fraction of that limit says how much of the saving the kernels
realize. Dense is sparsity 0 through transformers' own linears (``F.linear``); "fused dense" is the
sparse path at sparsity 0 (our kernels with every threshold zero: q/k/v and gate/up in one launch each),
which a dense user of this runtime also gets, so speedups are reported against the faster of the two.
Every configuration decodes greedily from the same random prompt through the same runtime: a static KV
cache, and on CUDA one CUDA graph per token (``runtime/graphs.py``), so launch overhead is out of both.
The byte limit is the read bandwidth (``read_gbps``, a reduction over 1 GiB) over the bytes a token reads.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import WinaError


def bench(
    path_or_model: str | os.PathLike | Any,
    sparsities: Iterable[float] = (0.0, 0.4, 0.5, 0.65),
    tokens: int = 128,
    prompt_tokens: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    *,
    compile: bool | None = None,
    seed: int = 0,
    batch: int = 1,
) -> dict[str, Any]:
    """Decode ``tokens`` tokens greedily, dense and at each sparsity; time every token.

    ``path_or_model``: a checkpoint (directory or Hub id), or a model from ``wina_convert.load``.
    Dense is always measured first; a sparsity of 0 in ``sparsities`` measures the sparse path (the
    kernels, every threshold zero) against it. ``compile`` (CUDA): record the ``torch.compile``'d step
    (None keeps the runtime's setting). On CPU the reference path runs without graphs (tiny models).
    ``batch``: sequences decoded together; a batched decode step runs dense on the kernel path unless
    the model's ``sparse_batch`` allows it (``runtime/kernels/hook.py``), and its row says so.
    With the kernels bound, sparsity 0 is always measured ("fused dense").

    Returns a dict:

    * ``model``, ``device``, ``gpu`` (name or None), ``dtype``, ``transform``, ``method``;
      ``kernels`` (gated linears bound to the triton kernels), ``graphs`` (decode replayed from CUDA
      graphs), ``compile``, ``attention`` (transformers' attention implementation); ``prompt_tokens``, ``tokens`` (tokens decoded per configuration; the
      first one comes from the prompt's forward, so ``tokens - 1`` steps are timed).
    * ``copy_gbps``: device-to-device copy bandwidth, bytes read + written per second / 1e9 (the
      roofline; None on CPU).
    * ``bytes``: per-token reads, dense: ``dense_per_token`` = ``gated`` (the gated matrices) +
      ``shortcuts`` (a transformed checkpoint's residual rotations) + ``lm_head`` + ``kv_cache``
      (the static cache, read whole by attention) + ``other`` (norms, the embedding row).
    * ``read_gbps``: read-only bandwidth (bytes read per second / 1e9; None on CPU);
      ``fastest_dense``: the label of the faster of dense and fused dense.
    * ``dense`` and ``rows`` (one per requested sparsity), each a dict: ``label``, ``sparsity``
      (asked; None for dense), ``achieved_sparsity`` (parameter-weighted fraction of the gated sub-blocks' weight columns
      skipped on the decoded tokens; the gated output head's are not among them), ``head_sparsity`` (the fraction of the
      output head's columns skipped; None without a head gate), ``path`` ("dense", "kernel" or "reference"), ``tokens_per_s``,
      ``latency_ms`` (median per token), ``latency_ms_p90``, ``bytes_per_token``, ``gbps`` (bytes
      per token x tokens/s), ``speedup`` (tokens/s over dense), ``limit`` (dense bytes / these
      bytes), ``fraction_of_limit`` (speedup / limit), ``same_tokens_as_dense``,
      ``speedup_vs_fastest_dense`` (tokens/s over the faster of dense and fused dense),
      ``byte_limit_tokens_per_s`` (read bandwidth / bytes per token) and ``fraction_of_byte_limit``;
      the dense row also has ``efficiency`` (gbps / copy_gbps, None on CPU).
    """
    from ..runtime.graphs import greedy
    from ..runtime.kernels.hook import force_kernels
    from ..runtime.load import load

    levels = [float(s) for s in sparsities]
    if tokens < 2:
        raise WinaError(f"--tokens must be at least 2, got {tokens}")
    if prompt_tokens < 1:
        raise WinaError(f"the prompt needs at least one token, got {prompt_tokens}")
    if batch < 1:
        raise WinaError(f"--batch must be at least 1, got {batch}")
    if isinstance(path_or_model, (str, os.PathLike)):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load(path_or_model, sparsity=0.0, device=dev, dtype=dtype)
        name = str(path_or_model)
    else:
        model = path_or_model
        name = str(getattr(model, "name_or_path", type(model).__name__))
    control = getattr(model, "wina", None)
    if control is None:
        raise WinaError("bench needs a WINA model: a checkpoint path or a model from wina_convert.load")
    if any(s > 0 for s in levels) and not control.calibrated:
        raise WinaError("this checkpoint is not calibrated: only sparsity 0 can be measured")
    param = next(model.parameters())
    dev = param.device
    runner = getattr(model, "wina_decode", None)
    if runner is not None and compile is not None:
        runner.compile = compile
    kernels_bound = any(g.kernel is not None for g in control.gates.values())
    if kernels_bound and 0.0 not in levels:
        levels = [0.0] + levels
    sparse_batch = min((getattr(g.kernel, "sparse_batch", batch) for g in control.gates.values() if g.kernel is not None),
                       default=batch)
    dense_batch = kernels_bound and batch > sparse_batch

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator).to(dev)

    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + tokens + 1)  # sized to the batch on first use
    previous = (control.sparsity, [(g.gate_prefill, g.counting) for g in control.gates.values()])
    control.set_counting(False)  # timed steps count nothing (``_achieved`` counts them apart)
    try:
        configs = [("dense", None)] + [("fused dense" if s == 0 else f"s={s:.2f}", s) for s in levels]
        rows, dense_tokens = [], None
        for label, s in configs:
            if s is None or s == 0:
                control.set_sparsity(0.0)
                if s == 0:
                    force_kernels(control)
            else:
                control.set_sparsity(s)
            greedy(model, prompt, min(tokens, 4), cache=cache)  # warm: kernels compile, the graph is recorded
            times, out = _timed_decode(model, prompt, tokens, cache, dev)
            row = {
                "label": label,
                "sparsity": s,
                "path": "dense" if s is None else ("dense (batch)" if dense_batch else "kernel" if kernels_bound else "reference"),
                "tokens_per_s": (tokens - 1) / sum(times),
                "latency_ms": statistics.median(times) * 1e3,
                "latency_ms_p90": _quantile(times, 0.9) * 1e3,
            }
            if s is None or dense_batch:  # a batched step beyond sparse_batch reads every weight
                dense_tokens = out if s is None else dense_tokens
                row["achieved_sparsity"], row["skipped_bytes"], row["head_sparsity"] = 0.0, 0, None
            else:
                row["achieved_sparsity"], row["skipped_bytes"], row["head_sparsity"] = _achieved(model, control, prompt, out)
            row["same_tokens_as_dense"] = bool(torch.equal(out, dense_tokens))
            rows.append(row)
    finally:
        control.set_sparsity(previous[0])
        for g, (prefill, counting) in zip(control.gates.values(), previous[1]):
            g.gate_prefill, g.counting = prefill, counting

    sizes = _bytes_per_token(model, control, cache)
    dense_bytes = sizes["dense_per_token"]
    copy = _copy_gbps(dev) if dev.type == "cuda" else None
    read = _read_gbps(dev) if dev.type == "cuda" else None
    dense = rows[0]
    fastest = max((r for r in rows if r["sparsity"] in (None, 0.0)), key=lambda r: r["tokens_per_s"])
    for row in rows:
        row["bytes_per_token"] = dense_bytes - row.pop("skipped_bytes")
        row["gbps"] = row["bytes_per_token"] * row["tokens_per_s"] / 1e9
        row["speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
        row["speedup_vs_fastest_dense"] = row["tokens_per_s"] / fastest["tokens_per_s"]
        row["limit"] = dense_bytes / row["bytes_per_token"]
        row["fraction_of_limit"] = row["speedup"] / row["limit"]
        # a token of a batch of B reads the weights once for all B (the KV cache B times: counted once, a bound)
        row["byte_limit_tokens_per_s"] = read * 1e9 * batch / row["bytes_per_token"] if read else None
        row["fraction_of_byte_limit"] = row["tokens_per_s"] / row["byte_limit_tokens_per_s"] if read else None
    dense["efficiency"] = dense["gbps"] / copy if copy else None
    wina_meta = getattr(model.config, "wina", None) or {}
    return {
        "model": name,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": str(param.dtype).removeprefix("torch."),
        "transform": bool(wina_meta.get("transform", sizes["shortcuts"] > 0)),
        "method": control.method,
        "kernels": kernels_bound,
        "graphs": runner is not None,
        "compile": bool(runner.compile) if runner is not None else False,
        "attention": getattr(model.config, "_attn_implementation", None),
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "batch": batch,
        "sparse_batch": sparse_batch,
        "copy_gbps": copy,
        "read_gbps": read,
        "fastest_dense": fastest["label"],
        "bytes": sizes,
        "dense": dense,
        "rows": rows[1:],
    }


def _timed_decode(model: Any, prompt: torch.Tensor, tokens: int, cache: Any, dev: torch.device) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of the ``tokens - 1`` decode steps, and the tokens. On CUDA, events recorded
    between steps (the host runs ahead, so a step's time is the GPU's); on CPU, the host clock."""
    from ..runtime.graphs import greedy

    if dev.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(tokens)]
        out = greedy(model, prompt, tokens, cache=cache, on_step=lambda i: events[i].record())
        torch.cuda.synchronize(dev)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(tokens - 1)], out
    stamps = [0.0] * tokens

    def stamp(i: int) -> None:
        stamps[i] = time.perf_counter()

    out = greedy(model, prompt, tokens, cache=cache, on_step=stamp)
    return [stamps[i + 1] - stamps[i] for i in range(tokens - 1)], out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@torch.no_grad()
def _achieved(model: Any, control: Any, prompt: torch.Tensor, generated: torch.Tensor) -> tuple[float, int, float | None]:
    """(parameter-weighted sparsity of the gated sub-blocks, weight bytes skipped per token, the head's fraction of columns
    skipped or None without a head gate) on the decoded tokens.

    Counted by the masking reference: a forward over prompt + decoded tokens minus one over the
    prompt alone (a causal model computes the prompt positions identically in both), each with the
    positions the runtime gates marked (``GateContext.gating``): the decoded ones, and the prompt's
    only if its gates' ``gate_prefill`` is on.
    """
    from .protocol import decode_positions

    gates = list(control.gates.values())
    counting = [g.counting for g in gates]
    prefill = any(g.gate_prefill for g in gates)
    whole = torch.cat([prompt, generated[:, :-1]], dim=1)  # the positions that fed each decode step
    for g in gates:
        g.counting = True
    try:
        control.reset_stats()
        with control.context.gating(decode_positions(prompt.shape, 0 if prefill else prompt.shape[1], prompt.device)):
            model(prompt)
        before = [(g.zeroed.clone(), g.tokens) for g in gates]
        control.reset_stats()
        with control.context.gating(decode_positions(whole.shape, 0 if prefill else prompt.shape[1], whole.device)):
            model(whole)
    finally:
        for g, c in zip(gates, counting):
            g.counting = c
    head = control.gates.get(control.head) if control.head else None
    skipped = total = zero = 0.0
    head_fraction = None
    for g, (z0, t0) in zip(gates, before):
        steps = g.tokens - t0
        if steps <= 0:
            continue
        fractions = ((g.zeroed - z0) / (steps * g.in_features)).tolist()
        for fraction, size in zip(fractions, g.splits):
            params = size * g.in_features
            skipped += fraction * g.weight_bytes * size / g.out_features  # as stored (quantized: codes, scales); the head's too
            if g is not head:  # the sparsity is the gated sub-blocks' (the head's is reported apart)
                zero += fraction * params
            else:
                head_fraction = fraction
    for g in gates:
        if g is not head:
            total += g.out_features * g.in_features
    control.reset_stats()
    return (zero / total if total else 0.0), int(round(skipped)), head_fraction


def _bytes_per_token(model: Any, control: Any, cache: Any) -> dict[str, int]:
    """What a dense decode step reads, by kind (parameters counted once, however they are viewed)."""
    seen: set[tuple[int, int]] = set()

    def size(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    def stored(g: Any) -> int:
        """A gate's weight as read: a quantized one's codes, scales and offsets (its float weight, the reference's
        copy, is marked counted so that it is not counted again below)."""
        dense = size(g.weight)
        return g.weight_bytes if g.quant is not None else dense

    gated = sum(stored(g) for n, g in control.gates.items() if n != control.head)
    shortcuts = sum(size(p) for n, p in model.named_parameters() if "shortcut" in n)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    lm_head = size(head.weight) if head is not None else 0
    embed_total = size(embed)
    embed_row = embed.shape[1] * embed.element_size() if embed_total else 0
    rest = sum(size(p) for p in model.parameters())
    kv = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
             for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
    other = rest + embed_row
    total = gated + shortcuts + lm_head + kv + other
    return {"dense_per_token": total, "gated": gated, "shortcuts": shortcuts, "lm_head": lm_head, "kv_cache": kv,
            "other": other}


def _median_gpu_seconds(fn, reps: int) -> float:
    """Median GPU time of ``fn()`` over ``reps`` calls (CUDA events around each), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_gbps(dev: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a ``nbytes`` buffer, median of ``reps``."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    seconds = _median_gpu_seconds(lambda: b.copy_(a), reps)
    del a, b
    return 2 * nbytes / seconds / 1e9


def _read_gbps(dev: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Read-only bandwidth: a sum over a ``nbytes`` buffer (bytes read per second / 1e9), median of ``reps``."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    seconds = _median_gpu_seconds(a.sum, reps)
    del a
    return nbytes / seconds / 1e9


def format_bench(result: dict[str, Any]) -> Any:
    """A rich Table of a ``bench`` result: one row per configuration, the roofline in the caption."""
    from rich.table import Table

    title = f"{Path(str(result['model'])).name}: decode, batch {result.get('batch', 1)}, {result['tokens']} tokens"
    table = Table(title=title, title_justify="left")
    for col in ("config", "achieved", "path", "tokens/s", "ms/token", "GB/s", "speedup", "x fastest dense", "limit",
                "% of limit", "% of byte limit"):
        table.add_column(col, justify="left" if col in ("config", "path") else "right")
    for row in [result["dense"], *result["rows"]]:
        dense = row["sparsity"] is None
        head = "" if row.get("head_sparsity") is None else f" (head {row['head_sparsity']:.0%})"
        table.add_row(
            row["label"],
            f"{row['achieved_sparsity']:.1%}{head}",
            row["path"],
            f"{row['tokens_per_s']:.1f}",
            f"{row['latency_ms']:.2f}",
            f"{row['gbps']:.0f}" if row["gbps"] >= 1 else f"{row['gbps']:.3f}",
            "1.00x" if dense else f"{row['speedup']:.2f}x",
            f"{row['speedup_vs_fastest_dense']:.2f}x",
            "" if dense else f"{row['limit']:.2f}x",
            "" if dense else f"{row['fraction_of_limit']:.0%}",
            "" if row.get("fraction_of_byte_limit") is None else f"{row['fraction_of_byte_limit']:.0%}",
        )
    parts = [f"{result['device']}" + (f" ({result['gpu']})" if result["gpu"] else ""), result["dtype"],
             "transform" if result["transform"] else "no transform",
             "CUDA graphs" + (" + torch.compile" if result["compile"] else "") if result["graphs"] else "no graphs"]
    if result.get("attention"):
        parts.append(f"attention {result['attention']}")
    if result["copy_gbps"]:
        eff = result["dense"]["efficiency"]
        parts.append(f"copy {result['copy_gbps']:.0f} GB/s, dense at {eff:.0%} of it")
    if result.get("read_gbps"):
        parts.append(f"read {result['read_gbps']:.0f} GB/s")
    parts.append(f"fastest dense: {result.get('fastest_dense', 'dense')}")
    parts.append(f"dense reads {result['bytes']['dense_per_token'] / 1e9:.3g} GB/token")
    table.caption = "; ".join(parts)
    return table
