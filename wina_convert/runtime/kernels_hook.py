"""Where the GPU kernels plug into the gated linears: CUDA + triton, else the masking reference."""

from __future__ import annotations

import torch

from .gating import WinaControl
from .modules import GatedLinear


def _kernel(x: torch.Tensor, gate: GatedLinear) -> torch.Tensor | None:
    from . import kernels

    return kernels.gated_linear(x, gate.weight_t, gate.thresholds, gate.splits if len(gate.splits) > 1 else None, gate.bias)


def enable_kernels(control: WinaControl) -> bool:
    """Route the gated linears through the triton kernels when the model is on a CUDA device."""
    gates = list(control.gates.values())
    if not gates or gates[0].weight.device.type != "cuda":
        return False
    try:
        from . import kernels
    except ImportError:
        return False
    if not kernels.triton_available(gates[0].weight.device):
        return False
    for gate in gates:
        gate.weight_t = kernels.pack_weight([gate.weight.detach()])
        gate.kernel = _kernel
    return True
