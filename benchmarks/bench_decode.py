"""Decode speed at Llama-3-8B shapes, dense vs WINA-sparse, with and without the transform (one GPU, bf16 or fp16).

    python benchmarks/bench_decode.py --out DIR [--layers 32] [--tokens 128] [--modes graphs,compile]
                                      [--work DIR] [--hf-dense] [--dtype float16] [--only 'no transform']
                                      [--batches 1,2,4,8] [--name decode_h200] [--lowrank 8,32 [--lowrank-apart]]
                                      [--head-sparsity 0.5] [--head-share 0.6]

No download: a random-weight Llama with Llama-3-8B's shapes (32 layers, hidden 4096, intermediate 14336,
32 heads, 8 KV heads, vocab 128256, bf16 unless --dtype float16) is built on the GPU and saved with a small byte-level BPE
tokenizer trained on the bundled calibration text (ids < 4096; the config keeps vocab 128256). It is
converted twice on the GPU (``transform=False`` and ``True``, target 0.5, a few calibration samples:
speed depends only on the sparsity achieved, which is measured and reported), then ``wina_convert.evaluate.bench``
decodes greedily (batch 1, static KV cache, one CUDA graph per token) dense and at 0 / 0.4 / 0.5 / 0.65,
in each mode: ``graphs`` (the eager step recorded) and ``compile`` (the ``torch.compile``'d step recorded).
Every speedup is given twice: over transformers' dense layout ("dense") and over our fused dense path
(sparsity 0 through the kernels, "fused dense"); the headline uses the faster of the two. ``--batches``
adds batched decoding (more than one sequence; the no-transform checkpoint, last mode only).
``--lowrank R[,R2]`` adds a checkpoint per rank (``convert --lowrank R``, no transform): its factors' bytes
count toward the sparsity, so each of its rows reads the bytes of the same row without factors;
``--lowrank-apart`` measures those checkpoints a second time with the term added by torch ops on top of
the kernels (the path of a group whose members' ranks differ) instead of inside the launch.
``--head-sparsity H[,H2]`` adds a no-transform checkpoint per value with its output head gated at it
(``convert --head-sparsity H``): each row's layers read what the plain checkpoint's do, the head ``1 - H``
of its columns. ``--head-share R[,R2]`` adds one per value with the head inside the budget
(``convert --head-sparsity auto`` with its share fixed at ``R`` instead of searched, as random weights have
nothing to search): at sparsity ``s`` the head skips ``R s`` of its columns and the layers fewer, the same bytes
in all as the plain checkpoint's row.
``--quant 4,8`` adds the no-transform checkpoint with its gated linears and head quantized (groups of 128,
``gl.quant``; the quantized kernels) at 0 / 0.4 / 0.5 / 0.65, compile mode, and ``--int4-baseline`` dense int4
through torch's ``_weight_int4pack_mm`` (group 128, every linear and the head; benchmarks/quant_decode.py).
``--hf-dense`` also measures dense through an unpacked model (``kernels=False``: transformers' weight layout),
to check that storing q/k/v and gate/up packed as ``W^T`` costs the dense path nothing.

Writes DIR/decode_h100.md (the table) and DIR/decode_h100.json (every number).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quant_decode.py beside this script
from wina_convert import convert, load
from wina_convert.calibration.text import BUNDLED
from wina_convert.evaluate.bench import bench
from wina_convert.runtime.graphs import enable_decode_graphs

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
SPARSITIES = (0.0, 0.4, 0.5, 0.65)


def build_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for p in sorted(BUNDLED.glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(directory)


def build_model(directory: Path, layers: int, shapes: dict, device: str, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> float:
    """Random weights (transformers' init, std 0.02; norm gains 1 +- 0.1) in ``dtype``, saved with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    config = LlamaConfig(num_hidden_layers=layers, **shapes)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="5GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    build_tokenizer(directory)
    return time.perf_counter() - t0


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(path: Path, modes: list[str], tokens: int, prompt: int, device: str, attention: str | None = None,
            batches: tuple[int, ...] = (), apart: bool = False, head_share: float | None = None) -> dict[str, dict]:
    out = {}
    t0 = time.perf_counter()
    model = load(path, sparsity=0.0, device=device)
    if head_share is not None:  # the head inside the budget at a fixed share (what --head-sparsity auto records)
        model.wina.use_budget(model.wina.budget.with_head(share=head_share))
    if apart:  # the low-rank term by torch ops on top of the kernels (group.compensated), not in the launch
        for group in {id(g.kernel): g.kernel for g in model.wina.gates.values() if g.kernel is not None}.values():
            group.lr_b = None
    model.wina.set_counting(False)  # no counting ops in the recorded steps
    if attention:  # e.g. "sdpa": transformers' own attention instead of the runtime's decode kernel
        model.set_attn_implementation(attention)
    load_s = time.perf_counter() - t0
    for mode in modes:
        t1 = time.perf_counter()
        res = bench(model, sparsities=SPARSITIES, tokens=tokens, prompt_tokens=prompt, compile=(mode == "compile"))
        res["wall_s"] = time.perf_counter() - t1
        res["load_s"] = load_s
        runner = getattr(model, "wina_decode", None)
        res["graph_failures"] = {str(k): v for k, v in runner.failures.items()} if runner else {}
        out[mode] = res
        print(f"  {path.name} {mode}: {res['wall_s']:.0f} s; " + ", ".join(
            f"{r['label']} {r['tokens_per_s']:.1f} tok/s" for r in [res["dense"], *res["rows"]]), flush=True)
    for b in batches:
        mode = modes[-1]
        res = bench(model, sparsities=SPARSITIES, tokens=tokens, prompt_tokens=prompt, compile=(mode == "compile"), batch=b)
        out[f"{mode}, batch {b}"] = res
        print(f"  {path.name} {mode} batch {b}: " + ", ".join(
            f"{r['label']} {r['tokens_per_s']:.1f} tok/s ({r['path']})" for r in [res["dense"], *res["rows"]]), flush=True)
    del model
    free()
    return out


def measure_hf_dense(path: Path, modes: list[str], tokens: int, prompt: int, device: str) -> dict[str, dict]:
    """Dense with transformers' own weight layout (no packing), same graphs/compile treatment."""
    out = {}
    model = load(path, sparsity=0.0, device=device, kernels=False)
    runner = enable_decode_graphs(model, model.wina.gates.values())
    for mode in modes:
        res = bench(model, sparsities=(), tokens=tokens, prompt_tokens=prompt, compile=(mode == "compile"))
        res["graph_failures"] = {str(k): v for k, v in runner.failures.items()} if runner else {}
        out[mode] = res
        print(f"  hf-layout dense {mode}: {res['dense']['tokens_per_s']:.1f} tok/s", flush=True)
    del model, runner
    free()
    return out


def table(results: dict, hf: dict | None, meta: dict) -> str:
    lines = []
    copy = next(iter(next(iter(results.values())).values()))["copy_gbps"]
    base = results.get("no transform") or next(iter(results.values()))  # the original model's dense run
    plain = {mode: res["dense"] for mode, res in base.items() if "batch" not in mode}
    lines.append(f"Device: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}. "
                 f"Random-weight Llama-3-8B shapes ({meta['layers']} layers), {meta.get('dtype', 'bfloat16')}, batch 1, greedy, "
                 f"prompt {meta['prompt']} tokens, {meta['tokens']} decode tokens ({meta['tokens'] - 1} timed), "
                 f"static KV cache, one CUDA graph per token, attention {next(iter(base.values())).get('attention')}. "
                 f"Device-to-device copy: {copy or 0:.0f} GB/s (read + write).")
    lines.append("")
    lines.append("| checkpoint | mode | config | path | achieved sparsity | tokens/s | ms/token (median) | GB/s | x dense (same ckpt) "
                 "| limit | % of limit | x plain dense | x fused dense | byte limit tok/s | % of byte limit |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ckpt, by_mode in results.items():
        for mode, res in by_mode.items():
            for row in [res["dense"], *res["rows"]]:
                dense = row["sparsity"] is None
                ref = plain.get(mode) or res["dense"]  # batched runs: their own dense
                vs_plain = row["tokens_per_s"] / ref["tokens_per_s"]
                fused = _fused(base.get(mode) or res)
                vs_fused = row["tokens_per_s"] / fused if fused else float("nan")
                bl, fb = row.get("byte_limit_tokens_per_s"), row.get("fraction_of_byte_limit")
                lines.append(
                    f"| {ckpt} | {mode} | {row['label']} | {row['path']} | {row['achieved_sparsity']:.1%} | {row['tokens_per_s']:.1f} "
                    f"| {row['latency_ms']:.2f} | {row['gbps']:.0f} | {'1.00' if dense else format(row['speedup'], '.2f')}x "
                    f"| {'' if dense else format(row['limit'], '.2f') + 'x'} | {'' if dense else format(row['fraction_of_limit'], '.0%')} "
                    f"| {vs_plain:.2f}x | {vs_fused:.2f}x | {'' if bl is None else format(bl, '.0f')} "
                    f"| {'' if fb is None else format(fb, '.0%')} |")
    lines.append("")
    for mode, d in plain.items():
        read = base[mode].get("read_gbps")
        lines.append(f"Dense baseline ({mode}): {d['tokens_per_s']:.1f} tokens/s = {d['gbps']:.0f} GB/s of "
                     f"{base[mode]['bytes']['dense_per_token'] / 1e9:.2f} GB per token, "
                     f"{(d['efficiency'] or 0):.0%} of the copy bandwidth"
                     + (f"; read bandwidth {read:.0f} GB/s; fastest dense: {base[mode].get('fastest_dense')}." if read else "."))
    if hf:
        for mode, res in hf.items():
            d = res["dense"]
            lines.append(f"Dense with transformers' weight layout (unpacked, {mode}): {d['tokens_per_s']:.1f} tokens/s "
                         f"({(d['efficiency'] or 0):.0%} of copy).")
    lines.append("")
    lines.append("'x fused dense' compares with our sparsity-0 path of the no-transform checkpoint (the kernels, every "
                 "threshold zero; for a batch, the same batch size): the dense speed a user of this runtime gets. "
                 "byte limit = read bandwidth x batch / bytes per token.")
    lines.append("'x dense' and 'limit' compare a checkpoint with its own dense run (a transformed checkpoint's dense reads "
                 "its shortcut rotations too); 'x plain dense' compares with the dense no-transform model, i.e. the original "
                 "model. limit = dense bytes / sparse bytes per token (weights + static KV cache, sparse bytes from the "
                 "achieved sparsity).")
    return "\n".join(lines) + "\n"


def measure_quant(path: Path, bits_list: list[int], baseline: bool, tokens: int, prompt: int, device: str) -> dict:
    """Quantized rows (benchmarks/quant_decode.py): ours at each bits and sparsity, torch's dense int4."""
    from quant_decode import other_bytes, quantize_model, swap_int4pack, time_rows

    out = {}
    for bits in bits_list:
        model = load(path, sparsity=0.0, device=device)
        t0 = time.perf_counter()
        qbytes = quantize_model(model, bits)
        print(f"  int{bits}: quantized in {time.perf_counter() - t0:.0f} s ({qbytes['gated'] / 1e9:.2f} GB gated)", flush=True)
        out[f"int{bits}"] = {"bytes": qbytes, **time_rows(model, SPARSITIES, tokens, prompt, qbytes)}
        del model
        free()
    if baseline:
        model = load(path, sparsity=0.0, device=device)
        total = swap_int4pack(model)
        free()
        print(f"  torch int4 g128: {total / 1e9:.2f} GB", flush=True)
        qbytes = {"gated": 0, "rest": total + other_bytes(model)}
        out["torch int4 g128"] = {"bytes": qbytes, **time_rows(model, (None,), tokens, prompt, qbytes)}
        del model
        free()
    return out


def quant_table(quant: dict, results: dict) -> str:
    """The quantized rows beside the float ones: tokens/s and the ratios of issue 30's targets."""
    base = results.get("no transform") or next(iter(results.values()))
    mode = "compile" if "compile" in base else next(iter(base))
    fused = _fused(base[mode])
    ours = {k: {r["sparsity"]: r for r in v["rows"]} for k, v in quant.items() if k.startswith("int")}
    torch4 = quant.get("torch int4 g128", {}).get("rows", [{}])[0].get("tokens_per_s")
    int4_dense = max([t for t in (torch4, ours.get("int4", {}).get(0.0, {}).get("tokens_per_s")) if t], default=None)
    int8_dense = ours.get("int8", {}).get(0.0, {}).get("tokens_per_s")
    lines = [f"Quantized ({mode} mode, same run): weights of every gated linear and of the head quantized with groups of "
             "128 (ours: int4 asymmetric / int8 symmetric along the outputs; torch: int4 asymmetric along the inputs, "
             "_weight_int4pack_mm, every linear separate, q/k/v not fused). 'x dense int4' = over the faster of torch's "
             "int4 and our int4 at sparsity 0; 'x own dense' = over the same precision at sparsity 0 through our kernels; "
             "'x fused bf16' = over the bf16 fused dense row above. Byte limit: read bandwidth / the bytes a token reads "
             "(quantized weights kept x (1 - achieved sparsity), head, KV cache, norms).", "",
             "| weights | sparsity | achieved | tokens/s | ms/token | x fused bf16 | x dense int4 | x own dense | % of byte limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in quant.items():
        for r in v["rows"]:
            own = ours.get(name, {}).get(0.0, {}).get("tokens_per_s")
            tps = r["tokens_per_s"]
            fmt = lambda a: f"{tps / a:.2f}x" if a else ""  # noqa: E731
            lines.append(f"| {name} | {'dense' if r['sparsity'] is None else r['sparsity']} | {r['achieved_sparsity']:.1%} "
                         f"| {tps:.1f} | {r['latency_ms']:.2f} | {fmt(fused)} | {fmt(int4_dense) if name != 'int8' else ''} "
                         f"| {fmt(own)} | {r.get('fraction_of_byte_limit', 0):.0%} |")
    lines.append("")
    lines.append(f"dense int4 = {int4_dense or 0:.1f} tokens/s; our int8 dense = {int8_dense or 0:.1f}; fused bf16 dense = "
                 f"{fused or 0:.1f}.")
    return "\n".join(lines) + "\n"


def _fused(res: dict) -> float | None:
    """Tokens/s of the fused dense row (sparsity 0 through the kernels) of a bench result, if measured."""
    return next((r["tokens_per_s"] for r in res["rows"] if r["sparsity"] == 0.0), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default=None, help="where the checkpoints are built (default /tmp/wina-decode-bench[-DTYPE])")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--modes", default="graphs,compile")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--allocation", default="greedy",
                    help="convert's --allocation (speed depends only on the sparsity achieved; greedy converts fastest)")
    ap.add_argument("--hf-dense", action="store_true")
    ap.add_argument("--attention", default=None,
                    help="attention implementation to run instead of the runtime's (e.g. sdpa, for comparison)")
    ap.add_argument("--only", default=None, help="measure one checkpoint: 'no transform' or 'transform'")
    ap.add_argument("--name", default="decode_h100")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes > 1 to measure too (no-transform checkpoint)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes, for trying the script on a CPU")
    ap.add_argument("--lowrank", default="", help="comma-separated ranks: a convert --lowrank checkpoint each")
    ap.add_argument("--lowrank-apart", action="store_true", help="measure those also with the term added by torch ops")
    ap.add_argument("--head-sparsity", default="", help="comma-separated: a checkpoint each with its output head gated at it")
    ap.add_argument("--head-share", default="", help="comma-separated: a checkpoint each with its head inside the budget at this share")
    ap.add_argument("--quant", default="", help="comma-separated bits (4,8): the no-transform checkpoint's gated linears "
                    "quantized (groups of 128), its head too, timed at 0 / 0.4 / 0.5 / 0.65 (compile mode)")
    ap.add_argument("--int4-baseline", action="store_true",
                    help="also dense int4 through torch's _weight_int4pack_mm, group 128, every linear and the head")
    args = ap.parse_args()
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    modes = [m for m in args.modes.split(",") if m]
    default_work = "/tmp/wina-decode-bench" + ("" if args.dtype == "bfloat16" else f"-{args.dtype}")
    out_dir, work = Path(args.out), Path(args.work or default_work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shapes = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=4096) if args.tiny else LLAMA3_8B
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "shapes": shapes,
            "transformers": transformers.__version__, "layers": args.layers, "tokens": args.tokens, "prompt": args.prompt,
            "modes": modes, "calibration": {"samples": args.samples, "seq_len": args.seq_len, "allocation": args.allocation},
            "attention": args.attention or "runtime default", "dtype": args.dtype}
    source = work / "llama3-8b-shape"
    ckpts = {"no transform": work / "wina-plain", "transform": work / "wina-transform"}
    ranks = [int(r) for r in args.lowrank.split(",") if r.strip()]
    for r in ranks:
        ckpts[f"low rank {r}"] = work / f"wina-lowrank{r}"
    heads = [float(h) for h in args.head_sparsity.split(",") if h.strip()]
    for h in heads:
        ckpts[f"head {h}"] = work / f"wina-head{h}"
    shares = [float(r) for r in args.head_share.split(",") if r.strip()]
    for r in shares:
        ckpts[f"head share {r}"] = work / f"wina-head{r}"  # the same checkpoint as head R: only its use differs
    if args.only:
        if args.only not in ckpts:
            ap.error(f"--only must be one of {sorted(ckpts)}")
        ckpts = {k: v for k, v in ckpts.items() if k == args.only or k.startswith(("low rank", "head"))}
    timings = {}
    if not source.exists() and not all(p.exists() for p in ckpts.values()):
        timings["build_s"] = build_model(source, args.layers, shapes, args.device, dtype=getattr(torch, args.dtype))
        print(f"built {source} in {timings['build_s']:.0f} s", flush=True)
    for name, path in ckpts.items():
        if path.exists():
            continue
        t0 = time.perf_counter()
        lowrank = name.split()[-1] if name.startswith("low rank") else None
        head = float(name.split()[-1]) if name.startswith("head") else 0.0  # (a share's: any calibrated head gate)
        convert(source, path, sparsity=0.5, transform=(name == "transform"), dtype=args.dtype, device=args.device,
                samples=args.samples, seq_len=args.seq_len, allocation=args.allocation, lowrank=lowrank,
                head_sparsity=head, quiet=True)
        timings[f"convert_{name}_s"] = time.perf_counter() - t0
        print(f"converted ({name}) in {timings[f'convert_{name}_s']:.0f} s", flush=True)
        free()
    shutil.rmtree(source, ignore_errors=True)  # disk: three 16 GB copies do not fit comfortably
    results = {}
    hf = None
    for name, path in ckpts.items():
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip() and int(b) > 1) if name == "no transform" else ()
        share = float(name.split()[-1]) if name.startswith("head share") else None
        results[name] = measure(path, modes, args.tokens, args.prompt, args.device, args.attention, batches, head_share=share)
        if name.startswith("low rank") and args.lowrank_apart:
            results[f"{name}, torch ops"] = measure(path, modes, args.tokens, args.prompt, args.device, args.attention,
                                                    apart=True)
        if name == "no transform" and args.hf_dense:
            hf = measure_hf_dense(path, modes, args.tokens, args.prompt, args.device)
        (out_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "timings": timings, "results": results,
                                                               "hf_dense": hf}, indent=1, default=str))
    quant = {}
    bits_list = [int(b) for b in args.quant.split(",") if b.strip()]
    if bits_list or args.int4_baseline:
        quant = measure_quant(ckpts.get("no transform") or next(iter(ckpts.values())), bits_list, args.int4_baseline,
                              args.tokens, args.prompt, args.device)
        (out_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "timings": timings, "results": results,
                                                               "hf_dense": hf, "quant": quant}, indent=1, default=str))
    text = table(results, hf, meta)
    if quant:
        text += "\n" + quant_table(quant, results)
    (out_dir / f"{args.name}.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
