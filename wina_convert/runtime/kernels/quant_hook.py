"""The quantized gated linears' kernel hook: one launch for the members of a shared-input group (q/k/v,
gate/up) whose weights are quantized (``GatedLinear.quant``, a ``QuantizedWeight``).

The members' ``QuantizedWeight``s are packed side by side along ``out`` (``quant.pack_quantized``, the way
``launch.pack_weight`` packs float ``W^T``); a group whose members' layouts differ is bound member by member.
As in ``hook.SharedInput``, the first member called on an input runs the launch for the whole group and the
others take their column slice of its output while they are called with the very same, unchanged tensor.

Inputs: a decode step of up to ``quant.MAX_ROWS`` sequences goes through the GEMV kernel, gated if it has at
most ``sparse_batch`` rows, else dense through the same kernel (thresholds ``-inf``: every row read once for
the batch); a prompt (several positions) through the dequantized weight and cuBLAS, masked when the gate
gates prompts (``GatedLinear.gate_prefill``). No path reads a float copy of the weight.
"""

from __future__ import annotations

import torch

from ..modules import GatedLinear
from . import quant as qk
from .group import compensated, copy_thresholds


def _decode_rows(x: torch.Tensor) -> int:
    """Sequences of a one-position decode input ``[B, 1, in]`` or ``[in]``/``[1, in]`` (0 for a prompt)."""
    if x.dim() == 3:
        return int(x.shape[0]) if x.shape[1] == 1 else 0
    return int(x.numel() // x.shape[-1]) if x.dim() <= 2 else 0


class QuantSharedInput:
    """One launch over the packed quantized weights of gated linears that read the same input."""

    def __init__(self, gates: list[GatedLinear]):
        self.gates = gates
        self.index = {id(g): i for i, g in enumerate(gates)}
        self.quant = qk.pack_quantized([g.quant for g in gates])
        device = self.quant.qweight.device
        self.bias = None
        if any(g.bias is not None for g in gates):
            self.bias = torch.cat([g.bias.detach() if g.bias is not None else torch.zeros(g.out_features, device=device)
                                   for g in gates])
        self.splits = [s for g in gates for s in g.splits]
        self.columns, start = [], 0
        for g in gates:
            self.columns.append((start, start + g.out_features))
            start += g.out_features
        rows = sum(len(g.splits) for g in gates)
        self.thr = torch.full((rows, gates[0].in_features), float("inf"), dtype=torch.float32, device=device)
        self.dense_thr = torch.full_like(self.thr, float("-inf"))
        self._thr_src: tuple = ()
        self._x: torch.Tensor | None = None
        self._x_version = -1
        self._y: torch.Tensor | None = None
        self._left: set[int] = set()
        self.sparse_batch = 1  # decode steps of more sequences than this run dense (hook.set_sparse_batch)
        self.shortcut = None  # (hook.fuse_shortcuts packs none into a quantized group)

    @staticmethod
    def packable(gates: list[GatedLinear]) -> bool:
        try:
            qk.pack_quantized([g.quant for g in gates])
        except ValueError:
            return False
        return True

    def refresh(self) -> None:
        """Copy the members' threshold rows into ``thr`` in place (its address is what a recorded graph reads);
        an inactive member gets ``+inf`` (its columns come out zero: it runs its own dense path)."""
        self._thr_src = copy_thresholds(self.gates, self.thr, self._thr_src)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The group's output columns, and whether they were computed dense (nothing dropped)."""
        rows = _decode_rows(x)
        dense = rows > self.sparse_batch or (rows == 0 and not all(g.gate_prefill for g in self.gates))
        return qk.quant_gated_linear_op(x, self.dense_thr if dense else self.thr, self.quant, self.splits, self.bias), dense

    def __call__(self, x: torch.Tensor, gate: GatedLinear) -> torch.Tensor | None:

        i = self.index[id(gate)]
        if not torch.compiler.is_compiling():
            self.refresh()
        if len(self.gates) == 1:
            y, dense = self._run(x)
            return compensated(gate, x, y, dense)
        c0, c1 = self.columns[i]
        if self._x is x and i in self._left and (torch.compiler.is_compiling() or self._x_version == x._version):
            y, dense = self._y
            self._left.discard(i)
        else:
            y, dense = self._y = self._run(x)
            self._x = x
            self._x_version = -1 if torch.compiler.is_compiling() else x._version
            self._left = {j for j, g in enumerate(self.gates) if g.active and j != i}
        if not self._left:
            self._x = self._y = None
        return compensated(gate, x, y[..., c0:c1], dense)


def bind_quantized(groups: list[list[GatedLinear]]) -> list[QuantSharedInput]:
    """Set the ``kernel`` hook of every quantized gate: one launch per group when the members' layouts pack,
    else one per member."""
    bound = []
    for members in groups:
        if not members:
            continue
        if len({g.in_features for g in members}) == 1 and QuantSharedInput.packable(members):
            parts = [members]
        else:
            parts = [[g] for g in members]
        for part in parts:
            group = QuantSharedInput(part)
            for g in part:
                g.kernel = group
            bound.append(group)
    return bound
