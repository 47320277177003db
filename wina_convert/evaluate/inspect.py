"""``wina inspect``: what a checkpoint holds, read from config.json and the sidecar (no weights loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..arch import adapter_for
from ..checkpoint.format import INDEX, MANIFEST, SIDECAR, base_config, read_sidecar, verify_checkpoint
from ..budget import Budget
from ..gate import interp
from ..quant import OFFSETS, QWEIGHT, SCALES
from ..weights import WeightFormat

QUANT_PARTS = (QWEIGHT, SCALES, OFFSETS)
ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def describe(directory: str | Path) -> dict[str, Any]:
    """A summary of the checkpoint and the per-layer, per-matrix sparsity at its target.

    Keys: base_model, architecture, layers, method, transform, basis (None without it), center, head_bases, lowrank (``name=rank``
    pairs, or none), target_sparsity, head_sparsity (the output head's, 0: dense), kept_bytes_fraction and bytes_per_token at the target (planned by the
    allocation, from the tensors' shapes: gated columns kept, shortcut rotations and low-rank factors, the
    lm_head (its kept columns when gated) and one embedding row), dtype, size, tool_version, calibration, files, layers_detail (``[{layer, sparsity: {matrix: s}}]``).
    """
    directory = Path(directory)
    wina = verify_checkpoint(directory, hashes=False)
    config_dict = json.loads((directory / "config.json").read_text())
    config = base_config(config_dict)
    adapter = adapter_for(config.model_type)
    sidecar, record = read_sidecar(directory / SIDECAR)
    manifest = json.loads((directory / MANIFEST).read_text())["files"]
    base = wina.get("base_model") or {}
    target = float(wina.get("target_sparsity") or 0.0)
    info: dict[str, Any] = {
        "path": str(directory),
        "base_model": base.get("id") if isinstance(base, dict) else base,
        "base_revision": base.get("revision") if isinstance(base, dict) else None,
        "architecture": ", ".join(wina.get("base_architectures") or []) or config.model_type,
        "layers": config.num_hidden_layers,
        "method": wina.get("method"),
        "transform": wina.get("transform"),
        "basis": wina.get("basis", "svd") if wina.get("transform") else None,
        "center": wina.get("center", "none"),
        "head_bases": wina.get("head_bases", "none"),
        "lowrank": ", ".join(f"{name}={rank}" for name, rank in (wina.get("lowrank") or {}).items()) or "none",
        "weights": WeightFormat.from_dict(wina.get("weights")).describe(),
        "target_sparsity": target,
        "head_sparsity": 0.0,
        "head_in_budget": record.head is not None and record.head_share is not None,
        "dtype": config_dict.get("dtype") or config_dict.get("torch_dtype"),
        "size": sum(entry["size"] for entry in manifest.values()),
        "files": len(manifest),
        "tool_version": wina.get("tool_version"),
        "calibration": wina.get("calibration"),
        "layers_detail": [],
    }
    levels = torch.tensor(record.allocation_levels or [0.0, 1.0], dtype=torch.float64)
    labels = [part for name in adapter.gated_linears() for part, _ in adapter.linear_outputs(name, config)]
    shapes, nbytes, dtypes = _shapes(directory)
    head = adapter.lm_head if adapter.lm_head in shapes else adapter.embed
    layer_sizes = []  # bytes of each stacked gated matrix as stored (a quantized one's codes, scales and offsets)
    for layer in range(config.num_hidden_layers):
        sizes = []
        for name in adapter.gated_linears():
            module = adapter.layer_key(layer, name)
            stored = sum(n for t, n in nbytes.items() if t.rpartition(".")[0] == module and t.rpartition(".")[2] in ("weight", *QUANT_PARTS))
            qweight = f"{module}.{QWEIGHT}"  # int4 codes are uint8 [in, out / 2], int8 ones int8 [in, out]
            rows = shapes[f"{module}.weight"][0] if qweight not in shapes else shapes[qweight][1] * (2 if dtypes[qweight] == "U8" else 1)
            sizes += [stored * r / rows for r in adapter.splits(name, config, rows)]
        layer_sizes.append(sizes)
    head_bytes, row_bytes = nbytes[head], nbytes[adapter.embed] / shapes[adapter.embed][0]
    budget = Budget.of(record, [sum(sizes) for sizes in layer_sizes], head_bytes)
    info["head_sparsity"] = budget.head_level(target)
    kept = dense = 0.0
    for layer, sizes in enumerate(layer_sizes):
        alloc = sidecar.get(f"{adapter.layers_prefix}.{layer}.allocation")
        level = budget.matrix_level(layer, target)
        values = [level] * len(sizes) if alloc is None or level <= 0 else interp(level, levels, alloc.T.to(torch.float64)).tolist()
        kept += sum((1 - v) * n for v, n in zip(values, sizes)) + budget.extra[layer] * sum(sizes)
        dense += sum(sizes)
        if alloc is not None and target > 0:
            info["layers_detail"].append({"layer": layer, "sparsity": dict(zip(labels, values))})
    info["kept_bytes_fraction"] = kept / dense - budget.head_offset(target)  # net of an in-budget head's saving
    head_kept = 1.0 - info["head_sparsity"]  # (convert --head-sparsity: the head gated too)
    info["bytes_per_token"] = kept + head_kept * head_bytes + row_bytes
    return info


def _shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, int], dict[str, str]]:
    """Every tensor's shape, bytes and dtype name, read from the safetensors headers (no data)."""
    from safetensors import safe_open

    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    shapes, nbytes, dtypes = {}, {}, {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(directory / shard), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[name] = tuple(piece.get_shape())
                dtypes[name] = piece.get_dtype()
                nbytes[name] = math.prod(shapes[name]) * ELEMENT_BYTES[dtypes[name]]
    return shapes, nbytes, dtypes
