"""``wina inspect``: what a checkpoint holds, read from config.json and the sidecar (no weights loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..arch import adapter_for
from ..checkpoint.format import MANIFEST, SIDECAR, base_config, read_sidecar, verify_checkpoint
from ..gate import interp


def describe(directory: str | Path) -> dict[str, Any]:
    """A summary of the checkpoint and the per-layer, per-matrix sparsity at its target.

    Keys: base_model, architecture, layers, method, transform, target_sparsity, dtype, size,
    tool_version, calibration, files, layers_detail (``[{layer, sparsity: {matrix: s}}]``).
    """
    directory = Path(directory)
    wina = verify_checkpoint(directory, hashes=False)
    config_dict = json.loads((directory / "config.json").read_text())
    config = base_config(config_dict)
    adapter = adapter_for(config.model_type)
    sidecar, meta = read_sidecar(directory / SIDECAR)
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
        "target_sparsity": target,
        "dtype": config_dict.get("dtype") or config_dict.get("torch_dtype"),
        "size": sum(entry["size"] for entry in manifest.values()),
        "files": len(manifest),
        "tool_version": wina.get("tool_version"),
        "calibration": wina.get("calibration"),
        "layers_detail": [],
    }
    levels = torch.tensor(meta.get("allocation_levels", [0.0, 1.0]), dtype=torch.float64)
    labels = [part for name in adapter.gated_linears() for part, _ in adapter.linear_outputs(name, config)]
    for layer in range(config.num_hidden_layers):
        alloc = sidecar.get(f"{adapter.layers_prefix}.{layer}.allocation")
        if alloc is None or target <= 0:
            continue
        values = interp(target, levels, alloc.T.to(torch.float64)).tolist()
        info["layers_detail"].append({"layer": layer, "sparsity": dict(zip(labels, values))})
    return info
