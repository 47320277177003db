"""What the fused launch of a group of gated linears needs, float or quantized weights alike (``hook.py``,
``quant_hook.py``): the members' threshold rows copied in place, the low-rank term of the channels dropped."""

from __future__ import annotations

import torch

from ..modules import GatedLinear


def copy_thresholds(gates: list, thr: torch.Tensor, last: tuple) -> tuple:
    """Copy the group's threshold rows into ``thr`` in place (its address is what a recorded graph reads), unless
    they are the tensors copied ``last``; an inactive member gets ``+inf`` (the launch reads none of its rows).
    Returns what was copied, to pass as ``last`` next time."""
    src = tuple(g.thresholds if g.active else None for g in gates)
    if len(src) == len(last) and all(a is b for a, b in zip(src, last)):
        return last
    row = 0
    for t, g in zip(src, gates):
        n = len(g.splits)
        if t is None:
            thr[row : row + n].fill_(float("inf"))
        else:
            thr[row : row + n].copy_(t)
        row += n
    return src


def compensated(gate: GatedLinear, x: torch.Tensor, y: torch.Tensor, batched: bool) -> torch.Tensor:
    """``y`` plus the gate's low-rank compensation of the channels the kernel dropped (``convert --lowrank``).

    The gated GEMV (one token) dropped the channels with ``|x| <= thresholds``: their part of ``x`` goes
    through the factors with torch ops of fixed shapes (recorded by the decode graphs, traced by
    torch.compile). A batched step through the kernel hook ran dense, and a gate whose thresholds are all
    zero (forced onto its kernel by the decode graphs) dropped nothing: nothing to add, no factor read.
    """
    if gate.lowrank_a is None or batched or not gate.drops:
        return y
    return y + gate.lowrank_term(x, x.abs().unsqueeze(-2) > gate.thresholds)
