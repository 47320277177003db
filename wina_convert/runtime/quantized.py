"""Loading a checkpoint whose gated matrices are quantized (``convert --weights int4|int8``).

transformers builds the model from config.json and finds no ``{module}.weight`` for a quantized linear (the
checkpoint has ``{module}.qweight``, ``.scales``, ``.offsets`` instead); this fills each such linear's weight with
its dequantized values (the torch reference computes with them, on any device) and hangs the quantized weight on
the module as ``quant`` (a ``GatedLinear`` takes it over when it is swapped in; the CUDA kernels read it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint.format import INDEX
from ..errors import WinaError
from ..quant import OFFSETS, QWEIGHT, SCALES, QuantizedWeight
from ..weights import WeightFormat


def load_quantized(model: nn.Module, weights: Path | dict[str, torch.Tensor], record: Any) -> dict[str, QuantizedWeight]:
    """Fill every quantized linear of ``model`` from ``weights`` (a checkpoint directory, or its tensors by name);
    returns them by module name (empty: float)."""
    fmt = WeightFormat.from_dict(record.weights)
    in_memory = isinstance(weights, dict)
    directory = "the model" if in_memory else weights
    weight_map = weights if in_memory else json.loads((weights / INDEX).read_text())["weight_map"]
    modules = sorted(name.removesuffix(f".{QWEIGHT}") for name in weight_map if name.endswith(f".{QWEIGHT}"))
    if modules and not fmt.quantized:
        raise WinaError(f"{directory} holds quantized tensors ({modules[0]}.{QWEIGHT}) but its config says its weights are float")
    loaded = {}
    for name in modules:
        names = [f"{name}.{part}" for part in (QWEIGHT, SCALES, OFFSETS) if f"{name}.{part}" in weight_map]
        tensors = {}
        for part in names:
            if in_memory:
                tensors[part] = weights[part]
                continue
            with safe_open(str(weights / weight_map[part]), framework="pt") as f:
                tensors[part] = f.get_tensor(part)
        q = QuantizedWeight.from_tensors(name, tensors)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise WinaError(f"{directory} has quantized weights for {name}, which the model does not have") from None
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (q.out_features, q.in_features):
            raise WinaError(f"the quantized weight of {name} ({q.out_features} x {q.in_features}) does not fit the model's linear")
        with torch.no_grad():
            linear.weight.data = q.dequantize(linear.weight.dtype).to(linear.weight.device)
        linear.quant = q
        loaded[name] = q
    return loaded
