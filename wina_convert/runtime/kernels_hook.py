"""Where the GPU kernels plug into the gated linears: CUDA + triton, else the masking reference.

Linears that read one input (q/k/v; gate/up) share one launch: their weights are packed once into one
``W^T`` (``[in, sum out]``, ``kernels.pack_weight``) and every member's ``weight`` becomes a transposed
view of its column block, so the model holds each weight ONCE (the packed layout replaces the original;
``F.linear`` and cuBLAS take the transposed views without a copy). The first member called with a
one-token input runs the fused GEMV for the whole group (each matrix with its own threshold row) and the
others return their slice of that output, as long as they are called with the very same tensor, unchanged
(same object, same version counter); any other input is computed on its own.

Only one-token inputs (decode) take the kernel; batches and prompts return ``None`` here, so
``GatedLinear`` runs its masking reference (masked ``F.linear``, cuBLAS). Kernels are used only while a
gate's ``counting`` is off: the decode graphs (``runtime/decode.py``) switch it off while they record.
"""

from __future__ import annotations

import torch
from torch import nn

from .gating import WinaControl
from .modules import GatedLinear


class SharedInput:
    """One launch for the gated linears that read the same input (one ``kernel`` hook per group).

    ``weight_t`` ``[in, sum out]`` holds every member's matrices side by side; ``splits`` lists the
    output sizes of all stacked matrices (a member may stack several, e.g. Phi-3's qkv_proj).
    """

    def __init__(self, gates: list[GatedLinear]):
        from . import kernels

        self.gates = gates
        self.index = {id(g): i for i, g in enumerate(gates)}
        self.weight_t = kernels.pack_weight([g.weight.detach() for g in gates])
        biases = [g.bias for g in gates]
        has_bias = any(b is not None for b in biases)
        self.bias = None
        if has_bias:
            self.bias = torch.cat([b.detach() if b is not None else g.weight.new_zeros(g.out_features)
                                   for g, b in zip(gates, biases)])
        self.splits = [s for g in gates for s in g.splits]
        self.columns, start = [], 0
        for g in gates:
            self.columns.append((start, start + g.out_features))
            start += g.out_features
        self._alias()
        rows = sum(len(g.splits) for g in gates)
        self.thr = torch.full((rows, gates[0].in_features), float("inf"), dtype=torch.float32, device=self.weight_t.device)
        self._thr_src: tuple = ()
        self._x: torch.Tensor | None = None
        self._x_version = -1
        self._y: torch.Tensor | None = None
        self._left: set[int] = set()

    def _alias(self) -> None:
        """Replace every member's weight (and bias) by a view of the packed tensors: one copy in memory."""
        for g, (c0, c1) in zip(self.gates, self.columns):
            g.weight = nn.Parameter(self.weight_t[:, c0:c1].t(), requires_grad=False)
            if g.bias is not None:
                g.bias = nn.Parameter(self.bias[c0:c1], requires_grad=False)
            g.weight_t = self.weight_t[:, c0:c1]

    def refresh(self) -> None:
        """Copy the members' threshold rows into ``thr`` ``[sum P, in]`` (in place: its address is what a
        recorded graph or a compiled step reads) when a member's thresholds or activity changed.

        An inactive member (dense: it runs ``F.linear`` and never asks for its slice) gets infinite
        thresholds, so the fused launch reads none of its rows.
        """
        src = tuple(g.thresholds if g.active else None for g in self.gates)
        if len(src) == len(self._thr_src) and all(a is b for a, b in zip(src, self._thr_src)):
            return
        row = 0
        for t, g in zip(src, self.gates):
            n = len(g.splits)
            if t is None:
                self.thr[row : row + n].fill_(float("inf"))
            else:
                self.thr[row : row + n].copy_(t)
            row += n
        self._thr_src = src

    def __call__(self, x: torch.Tensor, gate: GatedLinear) -> torch.Tensor | None:
        from . import kernels

        if x.numel() != gate.in_features:  # prompts and batches: the masking reference (cuBLAS)
            return None
        i = self.index[id(gate)]
        if not torch.compiler.is_compiling():  # a compiled step reads thr as refreshed before it ran
            self.refresh()
        if len(self.gates) == 1:
            return kernels.gated_linear_op(x, self.weight_t, self.thr, gate.splits, gate.bias)
        c0, c1 = self.columns[i]
        # (while torch.compile traces, the version counter is not readable: identity within one trace)
        if self._x is x and i in self._left and (torch.compiler.is_compiling() or self._x_version == x._version):
            y = self._y
            self._left.discard(i)
        else:
            y = kernels.gated_linear_op(x, self.weight_t, self.thr, self.splits, self.bias)
            self._x, self._y = x, y
            self._x_version = -1 if torch.compiler.is_compiling() else x._version
            self._left = {j for j, g in enumerate(self.gates) if g.active and j != i}
        if not self._left:  # every member served: drop the references
            self._x = self._y = None
        return y[..., c0:c1]


def input_groups(adapter, num_layers: int) -> list[list[str]]:
    """Full names of the gated linears that share an input, per layer: the attention inputs and the MLP
    inputs (each group of one for fused projections); the output projections alone."""
    groups = []
    for layer in range(num_layers):
        for names in (adapter.attn_inputs, (adapter.attn_output,), adapter.mlp_inputs, (adapter.mlp_output,)):
            groups.append([adapter.layer_key(layer, n) for n in names])
    return groups


def enable_kernels(control: WinaControl, groups: list[list[str]] | None = None) -> bool:
    """Route the gated linears through the triton kernels when the model is on a CUDA device.

    ``groups`` name the gates that share an input (``input_groups``); without it every gate is its own
    group. Returns False (and changes nothing) off CUDA or without triton.
    """
    gates = list(control.gates.values())
    if not gates or gates[0].weight.device.type != "cuda":
        return False
    try:
        from . import kernels
    except ImportError:
        return False
    if not kernels.triton_available(gates[0].weight.device):
        return False
    bind_kernels(control, groups)
    return True


def bind_kernels(control: WinaControl, groups: list[list[str]] | None = None) -> list[SharedInput]:
    """Pack the weights group by group and set every gate's ``kernel`` hook (any device; tests use CPU,
    where ``kernels.gated_linear`` computes with torch)."""
    from . import kernels

    if groups is None:
        groups = [[name] for name in control.gates]
    named = [[control.gates[n] for n in group if n in control.gates] for group in groups]
    covered = {id(g) for group in named for g in group}
    named += [[g] for g in control.gates.values() if id(g) not in covered]
    bound = []
    widest = 0
    with torch.no_grad():
        for members in named:
            if not members:
                continue
            if len({g.in_features for g in members}) != 1 or len({g.weight.dtype for g in members}) != 1:
                for g in members:  # cannot share a launch: bind them one by one
                    bound.append(_bind([g]))
            else:
                bound.append(_bind(members))
            widest = max(widest, bound[-1].weight_t.shape[1])
    device = next(iter(control.gates.values())).weight.device
    if device.type == "cuda":
        kernels.reserve_workspace(device, widest)
    return bound


def _bind(members: list[GatedLinear]) -> SharedInput:
    group = SharedInput(members)
    for g in members:
        g.kernel = group
    return group


def force_kernels(control: WinaControl) -> None:
    """Route every gate through its kernel even where its thresholds are all zero (the sparse path at
    sparsity 0, for measuring it against the dense one). ``set_sparsity`` undoes it."""
    for gate in control.gates.values():
        gate.active = True
    GatedLinear.epoch += 1
