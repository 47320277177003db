"""``wina convert``: read a model, transform it layer by layer, calibrate, write a WINA checkpoint.

The recipe streams: one decoder layer (plus the next one's attention basis) is in memory at a
time; it is transformed in float64, cast to the output dtype, handed to the calibrator (which
propagates the calibration hidden states through it), written to the current shard, and dropped.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .arch import Adapter, adapter_for
from .checkpoint import (
    FORMAT_VERSION,
    SIDECAR,
    TOKENIZER_FILES,
    WINA_MODEL_TYPE,
    OutputDir,
    ShardWriter,
    Source,
    open_source,
    parse_dtype,
    write_manifest,
    write_sidecar,
)
from .errors import WinaError
from .progress import Reporter
from .transform import column_norms, fold_norms, layer_bases, rotate_embedding, rotate_layer


@dataclass
class ConvertResult:
    output: Path
    seconds: float
    bytes_written: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", size, re.IGNORECASE)
    if not match:
        raise WinaError(f"cannot read size {size!r}: write e.g. 5GB or 500MB")
    unit = (match.group(2) or "B").upper().replace("B", "")
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "")]
    value = int(float(match.group(1)) * base**power)
    if value <= 0:
        raise WinaError(f"shard size must be positive, got {size!r}")
    return value


def _layer_tensors(source: Source, adapter: Adapter, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
    prefix = f"{adapter.layers_prefix}.{layer}."
    names = [n for n in source.names if n.startswith(prefix)]
    if not names:
        raise WinaError(f"the weights have no layer {layer}, but the config says {source.config.num_hidden_layers}: config and weights do not match")
    return {n[len(prefix):]: source.tensor(n).to(device=device, dtype=torch.float64) for n in names}


def transformed_layers(source: Source, adapter: Adapter, transform: bool, device: torch.device
                       ) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor | None]]:
    """Yield ``(layer, tensors, q_attn0)`` in order, float64, transformed when asked.

    ``q_attn0`` (the first layer's attention basis, which rotates the embeddings) comes with layer
    0 and is None afterwards and without the transform. Layer ``l`` needs layer ``l+1``'s
    attention basis for its down_proj, so the next layer is read one step ahead.
    """
    config = source.config
    count = config.num_hidden_layers
    if not transform:
        for layer in range(count):
            yield layer, _layer_tensors(source, adapter, layer, device), None
        return
    upcoming = _layer_tensors(source, adapter, 0, device)
    fold_norms(upcoming, adapter)
    upcoming_bases = layer_bases(upcoming, adapter, config)
    q_attn0 = upcoming_bases[0]
    for layer in range(count):
        current, (q_attn, q_mlp) = upcoming, upcoming_bases
        if layer + 1 < count:
            upcoming = _layer_tensors(source, adapter, layer + 1, device)
            fold_norms(upcoming, adapter)
            upcoming_bases = layer_bases(upcoming, adapter, config)
            q_next = upcoming_bases[0]
        else:
            q_next = torch.eye(config.hidden_size, dtype=torch.float64, device=device)
        rotate_layer(current, adapter, q_attn, q_mlp, q_next)
        yield layer, current, (q_attn0 if layer == 0 else None)


def output_config(source: Source, adapter: Adapter, out_dtype: torch.dtype, transform: bool, wina: dict[str, Any]) -> dict[str, Any]:
    config = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        config.pop(key, None)
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    wina["base_model_type"] = config["model_type"]
    wina["base_architectures"] = config.get("architectures") or [type(source.config).__name__.replace("Config", "ForCausalLM")]
    if transform:
        config["tie_word_embeddings"] = False
        config["model_type"] = WINA_MODEL_TYPE
        config["architectures"] = ["WinaConvertForCausalLM"]
    config["wina"] = wina
    return config


def _write_tokenizer(source: Source, directory: Path) -> None:
    tok = source.tokenizer_source
    if isinstance(tok, Path):
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                (directory / name).write_bytes((tok / name).read_bytes())
    elif tok is not None:
        tok.save_pretrained(directory)
    if source.generation_config is not None:
        source.generation_config.save_pretrained(directory)


def convert(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    sparsity: float = 0.5,
    transform: bool = True,
    dtype: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    device: str = "cpu",
    calibrate: bool = True,
    calibration: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    allocation: str = "greedy",
    method: str = "wina",
    trust_remote_code: bool = False,
    quiet: bool = False,
    reporter: Reporter | None = None,
) -> ConvertResult:
    """Convert ``model`` (Hub id, local directory or .gguf) into a WINA checkpoint at ``output``.

    See README.md for the output format. Returns where it wrote, how long it took and what.
    """
    start = time.perf_counter()
    _check_sparsity(sparsity)
    if method not in ("wina", "teal"):
        raise WinaError(f"unknown method {method!r}: use wina or teal")
    if allocation not in ("uniform", "greedy"):
        raise WinaError(f"unknown allocation {allocation!r}: use uniform or greedy")
    torch_device = _device(device)
    shard_bytes = parse_size(shard_size)
    target = Path(output).expanduser()
    out_dir = OutputDir(target, overwrite=overwrite)
    reporter = reporter or Reporter(quiet=quiet)
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    source = open_source(model, revision=revision, token=token, trust_remote_code=trust_remote_code)
    config = source.config
    adapter = adapter_for(config.model_type)
    out_dtype = parse_dtype(dtype) or source.dtype
    calibrator = None
    if calibrate:
        from .calibrate import Calibrator, load_calibration_tokens

        tokens, cal_info = load_calibration_tokens(source, calibration, samples=samples, seq_len=seq_len, seed=seed,
                                                   device=torch_device)
        calibrator = Calibrator(config, adapter, tokens, transform=transform, method=method, allocation=allocation,
                                target=sparsity, device=torch_device, dtype=out_dtype, info=cal_info)
    stages["read"] = time.perf_counter() - t0
    if out_dir.stale:
        reporter.log(f"[yellow]removing an interrupted conversion: {', '.join(p.name for p in out_dir.stale)}[/]")

    with reporter.running(), out_dir as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        sidecar: dict[str, torch.Tensor] = {}
        reporter.stage("transform" if transform else "copy", config.num_hidden_layers)
        embed = source.tensor(adapter.embed)
        t_transform = t_cal = 0.0
        for layer, tensors, q_attn0 in transformed_layers(source, adapter, transform, torch_device):
            t1 = time.perf_counter()
            if layer == 0:
                if q_attn0 is not None:
                    embed = rotate_embedding(embed.to(torch_device), q_attn0)
                embed = embed.to(out_dtype).cpu()
                writer.add(adapter.embed, embed)
                if calibrator is not None:
                    calibrator.embed(embed)
            prefix = f"{adapter.layers_prefix}.{layer}."
            final = {name: t.to(out_dtype).cpu() for name, t in tensors.items()}
            del tensors
            for name in adapter.gated_linears():
                splits = adapter.splits(name, config, final[f"{name}.weight"].shape[0])
                sidecar[f"{prefix}{name}.column_norms"] = column_norms(final[f"{name}.weight"], splits)
            t_transform += time.perf_counter() - t1
            if calibrator is not None:
                t2 = time.perf_counter()
                calibrator.layer(layer, final)
                t_cal += time.perf_counter() - t2
            for name, tensor in final.items():
                writer.add(prefix + name, tensor)
            reporter.advance()
        t3 = time.perf_counter()
        writer.add(adapter.final_norm, source.tensor(adapter.final_norm).to(out_dtype))
        if source.has(adapter.lm_head):
            writer.add(adapter.lm_head, source.tensor(adapter.lm_head).to(out_dtype))
        elif transform:  # tied: the head keeps the original embedding, untied from the rotated one
            writer.add(adapter.lm_head, source.tensor(adapter.embed).to(out_dtype))
        shards = writer.finish()
        stages["transform"] = t_transform
        stages["calibrate"] = t_cal
        meta: dict[str, Any] = {
            "method": method,
            "transform": transform,
            "num_layers": config.num_hidden_layers,
            "target_sparsity": sparsity if calibrator is not None else 0.0,
        }
        if calibrator is not None:
            cal_tensors, cal_meta = calibrator.finish()
            sidecar.update(cal_tensors)
            meta.update(cal_meta)
        write_sidecar(tmp / SIDECAR, sidecar, meta)
        wina = {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "method": method,
            "transform": transform,
            "target_sparsity": meta["target_sparsity"],
            "base_model": source.base,
            "license": getattr(config, "license", None),
            "sidecar": SIDECAR,
        }
        if calibrator is not None:
            wina["calibration"] = meta["calibration"]
        (tmp / "config.json").write_text(json.dumps(output_config(source, adapter, out_dtype, transform, wina), indent=2) + "\n")
        _write_tokenizer(source, tmp)
        from .hub import write_model_card

        write_model_card(tmp)
        write_manifest(tmp)
        stages["write"] = time.perf_counter() - t3
    total_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return ConvertResult(target, time.perf_counter() - start, total_bytes, stages,
                         meta.get("calibration") if calibrator is not None else None)


def _check_sparsity(sparsity: Any) -> None:
    from .runtime.gating import MAX_SPARSITY

    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity <= MAX_SPARSITY:
        raise WinaError(f"--sparsity must be a number in [0, {MAX_SPARSITY}], got {sparsity!r}")


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WinaError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WinaError("--device cuda was asked for, but no CUDA GPU is available")
    return dev
