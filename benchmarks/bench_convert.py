"""Scale benchmark of ``wina convert``: a random checkpoint of Llama-3-8B shapes, converted end to end.

What it does, in order (everything in one invocation, so that one device call does it all):

1. Writes a random-weight Llama checkpoint with the per-layer shapes of Llama-3-8B (hidden 4096,
   intermediate 14336, 32 heads, 8 kv heads, vocab 128256, untied, bf16) and ``--layers`` layers,
   as sharded safetensors (``--shard-size``, 5 GB by default), tensor by tensor through the
   library's streaming ``ShardWriter``, so the writer itself never holds more than one tensor.
   Weights are drawn on ``--device``. A byte-level BPE tokenizer (vocab 1024, trained here on
   ``wina_convert/calibration/data/train``; small so that the bundled text gives >= 128 windows of 512 tokens) is
   saved with it; config ``vocab_size`` stays 128256.
2. Runs the full ``wina_convert.convert`` (transform + calibration + write) in a subprocess and
   measures: seconds per stage (``ConvertResult.stage_seconds``), peak resident memory of that
   process (``VmHWM``, and the anonymous / file-backed split polled from ``/proc``), peak GPU memory
   (``torch.cuda.max_memory_allocated``, and ``max_memory_reserved``: what the caching allocator
   held), output size.
3. With ``--reference-svd``, times the transform alone on in-memory layers, ours against the
   reference approach (fold norms, float64 full SVD of k_proj and gate_proj by
   ``torch.linalg.svd``, rotations), on ``--reference-layers`` layers (2 by default) and
   extrapolates to 32 layers; plus single float64 decompositions for orientation.

Prints a markdown table last; ``--out-json`` / ``--out-md`` keep the numbers.

    python benchmarks/bench_convert.py --layers 4 --device cpu [--no-transform]          # this CPU machine
    python benchmarks/bench_convert.py --device cuda --samples 128 --seq-len 512 --reference-svd
    python benchmarks/bench_convert.py --layers 4 --no-transform --calibration self --samples 2 --seq-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
              tie_word_embeddings=False)
FULL_LAYERS = 32
TOKENIZER_VOCAB = 1024
GB = 1e9


# --------------------------------------------------------------------------- the random checkpoint

def write_tokenizer(directory: Path) -> int:
    """A byte-level BPE trained on the bundled calibration text; returns its EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from wina_convert.calibration.text import BUNDLED

    texts = [p.read_text(encoding="utf-8") for p in sorted(BUNDLED.glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast.eos_token_id


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    d, f = SHAPES["hidden_size"], SHAPES["intermediate_size"]
    kv = SHAPES["num_key_value_heads"] * d // SHAPES["num_attention_heads"]
    p = f"model.layers.{layer}."
    return {p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,), p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}


def random_tensor(name: str, shape: tuple[int, ...], device: str, generator):
    """Norm gains around 1 (so folding them is exercised), linear weights N(0, 0.02^2), in bf16."""
    import torch

    if len(shape) == 1:
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(0.1).add_(1.0)
    else:
        t = torch.empty(shape, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
    return t.to(torch.bfloat16)


def write_checkpoint(directory: Path, layers: int, device: str, shard_size: str, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig

    from wina_convert.checkpoint.writer import ShardWriter
    from wina_convert.units import parse_size

    start = time.perf_counter()
    directory.mkdir(parents=True)
    eos = write_tokenizer(directory)
    config = LlamaConfig(**SHAPES, num_hidden_layers=layers, bos_token_id=eos, eos_token_id=eos, dtype="bfloat16")
    config.save_pretrained(directory)
    generator = torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(directory, parse_size(shard_size))
    shapes = {"model.embed_tokens.weight": (SHAPES["vocab_size"], SHAPES["hidden_size"])}
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    shapes["model.norm.weight"] = (SHAPES["hidden_size"],)
    shapes["lm_head.weight"] = (SHAPES["vocab_size"], SHAPES["hidden_size"])
    for name, shape in shapes.items():
        writer.add(name, random_tensor(name, shape, device, generator))
    writer.finish()
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "bytes": size, "shards": len(list(directory.glob("*.safetensors")))}


# --------------------------------------------------------------------------- the measured conversion

def convert_child(args: argparse.Namespace) -> None:
    """Runs inside the measured subprocess: one conversion, its numbers to ``args.child_json``."""
    import resource

    import torch

    from wina_convert import convert
    from wina_convert.progress import Reporter

    class LineReporter(Reporter):
        """One line per layer (the bars are off without a terminal): a log that survives a timeout."""

        def advance(self, steps: int = 1) -> None:
            self.done = getattr(self, "done", 0) + steps
            print(f"  layer {self.done} done at {time.perf_counter() - start:.1f} s", flush=True)

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = convert(args.model, args.output, device=args.device, samples=args.samples, seq_len=args.seq_len,
                     calibration=args.calibration, transform=args.transform, shard_size=args.shard_size, reporter=LineReporter(quiet=True))
    out = {
        "seconds": result.seconds,
        "stage_seconds": result.stage_seconds,
        "bytes_written": result.bytes_written,
        "transform": args.transform,
        "calibration": {k: result.calibration.get(k) for k in ("dataset", "samples", "seq_len", "tokens", "allocation")}
        if result.calibration else None,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "vm_hwm_bytes": _status_bytes(os.getpid()).get("VmHWM"),
    }
    if cuda:
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["gpu"] = torch.cuda.get_device_name()
    Path(args.child_json).write_text(json.dumps(out, indent=2))


def _status_bytes(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes (Linux ``/proc``)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def run_convert(args: argparse.Namespace, model: Path, output: Path, child_json: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--convert-child", "--model", str(model),
           "--output", str(output), "--device", args.device, "--shard-size", args.shard_size,
           "--child-json", str(child_json), "--transform" if args.transform else "--no-transform"]
    if args.samples is not None:
        cmd += ["--samples", str(args.samples)]
    if args.calibration is not None:
        cmd += ["--calibration", args.calibration]
    if args.seq_len is not None:
        cmd += ["--seq-len", str(args.seq_len)]
    peaks: dict[str, int] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)

    def poll() -> None:
        while proc.poll() is None:
            for key, value in _status_bytes(proc.pid).items():
                peaks[key] = max(peaks.get(key, 0), value)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    code = proc.wait()
    poller.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the conversion failed (exit {code})")
    result = json.loads(child_json.read_text())
    result["wall_seconds"] = wall
    result["polled_peaks_bytes"] = peaks
    return result


# --------------------------------------------------------------------------- transform alone, against the reference

def transform_comparison(device: str, layers: int, seed: int = 0) -> dict:
    """Transform-only seconds per layer on in-memory layers: ours and the reference approach.

    Both start from the same bf16 layers already on ``device`` and end with bf16 weights on it;
    neither reads nor writes files. Ours = the MLP basis of the layer, the attention basis of the
    next one (eigh / QR, float64), blocked float64 folding + rotations, shortcuts (exactly what
    ``convert`` runs per layer). Reference = float64 copies of the layer, norms folded, full SVD
    (``torch.linalg.svd``, ``full_matrices=True``) of k_proj and gate_proj, the same rotations and
    shortcuts. One untimed warm-up layer each (library handles, workspaces); then ``layers`` timed.
    """
    import torch

    from wina_convert.arch import adapter_for
    from wina_convert.transform import attention_basis, transform_layer
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES, num_hidden_layers=FULL_LAYERS)
    adapter = adapter_for("llama")
    generator = torch.Generator(device=device).manual_seed(seed)
    dev = torch.device(device)

    def layer_tensors() -> dict[str, torch.Tensor]:
        return {k.split(".", 3)[3]: random_tensor(k, s, device, generator) for k, s in layer_shapes(0).items()}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours(layer, following) -> None:
        q_attn = attention_basis(layer, adapter, config, dev)  # carried over from the previous layer in convert
        sync()
        start = time.perf_counter()
        q_next = attention_basis(following, adapter, config, dev)
        out = transform_layer(layer, adapter, config, q_attn, q_next, torch.bfloat16)
        sync()
        del out
        return time.perf_counter() - start

    def reference(layer, following) -> float:
        sync()
        start = time.perf_counter()
        w = {k: v.to(torch.float64) for k, v in layer.items()}
        for norm, consumers in (("input_layernorm", adapter.attn_inputs), ("post_attention_layernorm", adapter.mlp_inputs)):
            for c in consumers:
                w[f"{c}.weight"] = w[f"{c}.weight"] * w[f"{norm}.weight"]
        _, _, vh_attn = torch.linalg.svd(w["self_attn.k_proj.weight"])
        _, _, vh_mlp = torch.linalg.svd(w["mlp.gate_proj.weight"])
        q_attn, q_mlp = vh_attn.T, vh_mlp.T
        q_next = q_attn  # stands in for the next layer's basis, computed when that layer is transformed
        out = {}
        for c in adapter.attn_inputs:
            out[c] = (w[f"{c}.weight"] @ q_attn).to(torch.bfloat16)
        out["o"] = (q_mlp.T @ w["self_attn.o_proj.weight"]).to(torch.bfloat16)
        for c in adapter.mlp_inputs:
            out[c] = (w[f"{c}.weight"] @ q_mlp).to(torch.bfloat16)
        out["down"] = (q_next.T @ w["mlp.down_proj.weight"]).to(torch.bfloat16)
        out["s1"] = (q_mlp.T @ q_attn).to(torch.bfloat16)
        out["s2"] = (q_next.T @ q_mlp).to(torch.bfloat16)
        sync()
        del out, w
        return time.perf_counter() - start

    result: dict = {"device": device, "layers_timed": layers}
    following = layer_tensors()
    for name, fn in (("ours", ours), ("reference_svd", reference)):
        times = []
        for i in range(layers + 1):
            layer = layer_tensors()
            seconds = fn(layer, following)
            if i > 0:
                times.append(seconds)
            del layer
        result[name] = {"per_layer_seconds": times, "mean_per_layer": sum(times) / len(times),
                        "extrapolated_32_layers": sum(times) / len(times) * FULL_LAYERS}
    result["speedup"] = result["reference_svd"]["mean_per_layer"] / result["ours"]["mean_per_layer"]
    result["decompositions"] = _decompositions(dev, generator)
    return result


def _decompositions(dev, generator) -> dict[str, float]:
    """Single float64 decompositions at the shapes the transform meets, median of 3 (seconds)."""
    import torch

    def timed(fn) -> float:
        times = []
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    d, kv = SHAPES["hidden_size"], SHAPES["hidden_size"] // 4
    a = torch.randn(d, d, dtype=torch.float64, device=dev, generator=generator)
    gram = a.T @ a
    k = torch.randn(kv, d, dtype=torch.float64, device=dev, generator=generator)
    out = {"eigh_4096_f64": timed(lambda: torch.linalg.eigh(gram)),
           "eigh_4096_f32": timed(lambda: torch.linalg.eigh(gram.float())),
           "qr_complete_4096x1024_f64": timed(lambda: torch.linalg.qr(k.T, mode="complete"))}
    if dev.type == "cuda":
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            out["eigh_4096_f64_magma"] = timed(lambda: torch.linalg.eigh(gram))
        except RuntimeError as e:
            out["eigh_4096_f64_magma"] = f"unavailable: {e}"
        finally:
            torch.backends.cuda.preferred_linalg_library("default")
    return out


# --------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    lines = []
    conv = report.get("convert")
    if conv:
        st = conv["stage_seconds"]
        peaks = conv["polled_peaks_bytes"]
        cal = conv.get("calibration") or {}
        lines += [f"### `wina convert`: {report['layers']} layers of Llama-3-8B shape, random bf16, {report['device_name']}",
                  "",
                  f"Input {report['checkpoint']['bytes'] / GB:.2f} GB in {report['checkpoint']['shards']} shards; "
                  f"{'with' if conv.get('transform', True) else 'without'} the transform; "
                  f"calibration {cal.get('samples')} x {cal.get('seq_len')} tokens ({cal.get('allocation')} allocation); "
                  f"output {conv['bytes_written'] / GB:.2f} GB.",
                  "",
                  "| stage | seconds |", "| --- | ---: |"]
        for name in ("setup", "read", "transform", "calibrate", "write"):
            if name in st:
                lines.append(f"| {name} | {st[name]:.1f} |")
        lines.append(f"| **total** (`ConvertResult.seconds`) | **{conv['seconds']:.1f}** |")
        lines.append(f"| process wall time (imports, CUDA init included) | {conv['wall_seconds']:.1f} |")
        lines += ["", "| memory | GB |", "| --- | ---: |",
                  f"| peak host RSS (VmHWM) | {conv['vm_hwm_bytes'] / GB:.2f} |",
                  f"| peak anonymous RSS (polled every 50 ms) | {peaks.get('RssAnon', 0) / GB:.2f} |",
                  f"| peak file-backed RSS (polled) | {peaks.get('RssFile', 0) / GB:.2f} |"]
        if "cuda_max_allocated_bytes" in conv:
            lines += [f"| peak GPU memory allocated (`max_memory_allocated`) | {conv['cuda_max_allocated_bytes'] / GB:.2f} |",
                      f"| peak GPU memory reserved by the caching allocator | {conv['cuda_max_reserved_bytes'] / GB:.2f} |"]
    comp = report.get("transform_comparison")
    if comp:
        o, r = comp["ours"], comp["reference_svd"]
        lines += ["", f"### Transform alone, in-memory layers, {report['device_name']} "
                      f"({comp['layers_timed']} layers timed, extrapolated to 32)", "",
                  "| approach | s / layer | 32 layers (s) |", "| --- | ---: | ---: |",
                  f"| reference: float64 full SVD of k_proj + gate_proj, rotations | {r['mean_per_layer']:.3f} | {r['extrapolated_32_layers']:.1f} |",
                  f"| ours: eigh / QR bases, blocked float64 rotations | {o['mean_per_layer']:.3f} | {o['extrapolated_32_layers']:.1f} |",
                  f"| speedup | {comp['speedup']:.1f}x | |"]
        if conv and "transform" in conv["stage_seconds"]:
            lines.append(f"| ours inside the full convert (transform stage, {report['layers']} layers) | "
                         f"{conv['stage_seconds']['transform'] / report['layers']:.3f} | {conv['stage_seconds']['transform']:.1f} |")
        lines += ["", "single float64 decompositions (s): " +
                  ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in comp["decompositions"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (convert's default if unset)")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (convert's default if unset)")
    parser.add_argument("--calibration", default=None, help="convert's --calibration (e.g. self); the bundled set if unset")
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--transform", action=argparse.BooleanOptionalAction, default=True,
                        help="convert with the transform (default: on, the heavier path; --no-transform is convert's default)")
    parser.add_argument("--workdir", default="/tmp/wina-bench", help="where the checkpoint and its conversion go (removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--reference-svd", action="store_true", help="also time the transform alone against full float64 SVD")
    parser.add_argument("--reference-layers", type=int, default=2)
    parser.add_argument("--no-convert", action="store_true", help="only the transform comparison")
    parser.add_argument("--out-json")
    parser.add_argument("--out-md")
    # internal: the measured subprocess
    parser.add_argument("--convert-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert_child:
        convert_child(args)
        return

    import torch

    cuda = args.device.startswith("cuda")
    report: dict = {"layers": args.layers, "device": args.device, "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count(),
                    "device_name": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"}
    work = Path(args.workdir)
    if args.reference_svd:  # first: quick, and useful even if the long part runs out of time
        print("timing the transform alone against the reference ...", flush=True)
        report["transform_comparison"] = transform_comparison(args.device, args.reference_layers)
        print(json.dumps(report["transform_comparison"], indent=1), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_convert:
        shutil.rmtree(work, ignore_errors=True)
        model, output = work / "model", work / "converted"
        print(f"writing a random {args.layers}-layer checkpoint to {model} ...", flush=True)
        report["checkpoint"] = write_checkpoint(model, args.layers, args.device, args.shard_size)
        if cuda:
            torch.cuda.empty_cache()
        print(f"  {report['checkpoint']['bytes'] / GB:.2f} GB in {report['checkpoint']['seconds']:.1f} s; converting ...", flush=True)
        report["convert"] = run_convert(args, model, output, work / "child.json")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(report)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=2) + "\n")
    if args.out_md:
        Path(args.out_md).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
