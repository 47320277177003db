"""Where the GPU kernels plug into the gated linears: CUDA + triton, else the masking reference.

Linears that read one input (q/k/v; gate/up) share one launch: their weights are packed once into one
``W^T`` (``[in, sum out]``, ``launch.pack_weight``) and every member's ``weight`` becomes a transposed
view of its column block, so the model holds each weight ONCE (the packed layout replaces the original;
``F.linear`` and cuBLAS take the transposed views without a copy). The first member called with a
one-token input runs the fused GEMV for the whole group (each matrix with its own threshold row) and the
others return their slice of that output, as long as they are called with the very same tensor, unchanged
(same object, same version counter); any other input is computed on its own.

A transformed model's shortcut rotations join the launch of the linears that follow the same residual
(``fuse_shortcuts``): the layer's norm is an RMSNorm without weight there, so the launch reads the
normalized input ``x = h / rms(h)`` and scales the shortcut's sums by ``rms(h)`` (``gated_linear``'s
``rms_*`` arguments): ``h S^T`` without a separate dense GEMV.

Low-rank factors (``convert --lowrank``) join the launch too when every member of a group has them, of one
rank: ``B_p^T`` and ``A^T`` are packed beside ``W^T`` (``[in, P R]``, ``[R, sum out]``; the members'
``lowrank_a``/``lowrank_b`` become views of them) and the GEMV adds the compensation of the channels it
dropped (``gated_linear``'s ``lr_*`` arguments). A group with mixed ranks adds it on top of the
kernel's output with torch ops (``group.compensated``).

Only one-token inputs (decode) take the kernel; prompts return ``None`` here, so ``GatedLinear`` runs
its masking reference (masked ``F.linear``, cuBLAS). A decode step of more than ``sparse_batch`` sequences
(``set_sparse_batch``; default 1) runs dense through the packed weight: the union of the rows' masks keeps
73% (B=2) to 98% (B=8) of the weight rows at sparsity 0.5, so no gated path read fewer bytes than cuBLAS, and
masking cost 10-17 us a matrix on top (docs/kernels.md, batch > 1). Kernels are used only while a
gate's ``counting`` is off: the decode graphs (``runtime/graphs.py``) switch it off while they record.
"""

from __future__ import annotations

import torch
from torch import nn

from ..control import WinaControl
from ..modules import GatedLinear, WinaDecoderLayer
from . import launch
from .backend import triton_available
from .group import compensated, copy_thresholds


class SharedInput:
    """One launch for the gated linears that read the same input (one ``kernel`` hook per group).

    ``weight_t`` ``[in, sum out]`` holds every member's matrices side by side; ``splits`` lists the
    output sizes of all stacked matrices (a member may stack several, e.g. Phi-3's qkv_proj).
    """

    def __init__(self, gates: list[GatedLinear]):
        self.gates = gates
        self.index = {id(g): i for i, g in enumerate(gates)}
        self._pack()

    def _pack(self) -> None:
        gates = self.gates
        self.weight_t = launch.pack_weight([g.weight.detach() for g in gates])
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
        self._pack_lowrank()
        rows = sum(len(g.splits) for g in gates)
        self.thr = torch.full((rows, gates[0].in_features), float("inf"), dtype=torch.float32, device=self.weight_t.device)
        self._thr_src: tuple = ()
        self._x: torch.Tensor | None = None
        self._x_version = -1
        self._y: torch.Tensor | None = None
        self._left: set[int] = set()
        self.shortcut: nn.Linear | None = None
        self.rms_mask = 0
        self.rms_eps = 0.0
        self.sparse_batch = 1  # decode steps of more sequences than this run dense (set_sparse_batch)

    def _alias(self) -> None:
        """Replace every member's weight (and bias) by a view of the packed tensors: one copy in memory."""
        for g, (c0, c1) in zip(self.gates, self.columns):
            g.weight = nn.Parameter(self.weight_t[:, c0:c1].t(), requires_grad=False)
            if g.bias is not None:
                g.bias = nn.Parameter(self.bias[c0:c1], requires_grad=False)
            g.weight_t = self.weight_t[:, c0:c1]
        self._packed = (self.gates[0].weight.data_ptr(), self.weight_t.dtype, self.weight_t.device)

    def _pack_lowrank(self) -> None:
        """Pack the members' low-rank factors for the launch (``lr_b`` ``[in, sum P R]``, ``lr_a`` ``[R, sum
        out]``) if every member has factors of one rank, and make the members' factors views of them;
        otherwise ``lr_b`` is None and each gate adds its term with torch ops (``group.compensated``)."""
        gates = self.gates
        self.lr_b = self.lr_a = None
        self.lr_rank = self.lr_mask = 0
        ranks = {None if g.lowrank_a is None else int(g.lowrank_a.shape[1]) for g in gates}
        if len(ranks) == 1 and None not in ranks and all(g.lowrank_a.dtype == self.weight_t.dtype for g in gates):
            r = ranks.pop()
            with torch.no_grad():
                self.lr_b = torch.cat([g.lowrank_b.reshape(-1, g.in_features) for g in gates]).t().contiguous()
                self.lr_a = torch.cat([g.lowrank_a.t() for g in gates], dim=1).contiguous()
            self.lr_rank, row = r, 0
            for g, (c0, c1) in zip(gates, self.columns):
                n = len(g.splits)
                g.lowrank_b = self.lr_b[:, row * r : (row + n) * r].t().reshape(n, r, g.in_features)
                g.lowrank_a = self.lr_a[:, c0:c1].t()
                row += n
        self._lr_src = tuple((g.lowrank_a, g.lowrank_b) for g in gates)
        self._lr_flags = None

    def _lowrank_mask(self) -> int:
        """Bit ``p`` for each stacked matrix whose gate is active, drops channels and has factors."""
        mask, row = 0, 0
        for g in self.gates:
            if g.active and g.drops and self.lr_b is not None:
                mask |= ((1 << len(g.splits)) - 1) << row
            row += len(g.splits)
        return mask

    def lowrank_args(self) -> tuple:
        """``gated_linear``'s ``lr_b, lr_a, lr_rank, lr_mask`` for this group's launch (no term: Nones)."""
        if self.lr_b is None or not self.lr_mask:
            return None, None, 0, 0
        return self.lr_b, self.lr_a, self.lr_rank, self.lr_mask

    def stale(self) -> bool:
        """True after ``model.to(dtype/device)``: the members' weights are no longer views of ``weight_t``."""
        w = self.gates[0].weight
        return (w.data_ptr(), w.dtype, w.device) != self._packed

    def repack(self) -> None:
        """Pack the members' (converted) weights again, the shortcut too; the old packed copy is freed (no
        reference to it is left) and the model's recorded decode graphs are dropped (new addresses)."""
        shortcut, eps = self.shortcut, self.rms_eps
        self._pack()
        if shortcut is not None:
            self.add_shortcut(shortcut, eps)
        self.gates[0].context.epoch += 1
        if self.weight_t.is_cuda:
            launch.reserve_workspace(self.weight_t.device, self.weight_t.shape[1])

    def refresh(self) -> None:
        """Copy the members' threshold rows into ``thr`` ``[sum P, in]`` (in place: its address is what a
        recorded graph or a compiled step reads) when a member's thresholds or activity changed.

        An inactive member (dense: it runs ``F.linear`` and never asks for its slice) gets infinite
        thresholds, so the fused launch reads none of its rows.
        """
        if any(a is not g.lowrank_a or b is not g.lowrank_b for g, (a, b) in zip(self.gates, self._lr_src)):
            self._pack_lowrank()  # a member's factors were set or converted since the last pack
        flags = tuple((g.active, g.drops) for g in self.gates)
        if flags != self._lr_flags:
            self.lr_mask, self._lr_flags = self._lowrank_mask(), flags
        self._thr_src = copy_thresholds(self.gates, self.thr, self._thr_src)

    def add_shortcut(self, shortcut: nn.Linear, eps: float) -> None:
        """Pack a dense ``d x d`` shortcut (applied to the un-normalized input) as the group's last matrix.

        Its threshold row is ``-inf`` (every row read); its weight becomes a view of the packed ``W^T``.
        """
        with torch.no_grad():
            d = shortcut.out_features
            start = self.weight_t.shape[1]
            self.weight_t = torch.cat([self.weight_t, shortcut.weight.detach().t()], dim=1)
            if self.bias is not None:
                self.bias = torch.cat([self.bias, self.bias.new_zeros(d)])
            self._alias()
            shortcut.weight = nn.Parameter(self.weight_t[:, start:].t(), requires_grad=False)
            shortcut.weight_t = self.weight_t[:, start:]
            self.thr = torch.cat([self.thr, self.thr.new_full((1, self.thr.shape[1]), float("-inf"))])
        self._thr_src = ()
        self.splits = self.splits + [d]
        self.shortcut_columns = (start, start + d)
        self.shortcut = shortcut
        # the members alone (a call on an input that no decode_shortcut primed): the packed tensors' prefixes
        rows = len(self.splits) - 1
        self._members = (self.weight_t[:, :start], self.thr[:rows], self.splits[:rows],
                         None if self.bias is None else self.bias[:start])
        self.rms_mask = 1 << (len(self.splits) - 1)
        self.rms_eps = float(eps)

    def decode_shortcut(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """``shortcut(h)`` from the group's launch on ``x = norm(h)``, which also serves the members' calls
        on ``x``; ``None`` (nothing launched) unless this is a one-token decode through the kernels."""
        if self.shortcut is None or x.numel() != self.thr.shape[1] or h.numel() != x.numel():
            return None
        if not torch.compiler.is_compiling() and self.stale():
            self.repack()
        if any(g.counting for g in self.gates) or not any(g.active for g in self.gates):  # (tally: counted in forward)
            return None
        if not torch.compiler.is_compiling():
            self.refresh()
        norm = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)
        y = launch.gated_linear_op(x, self.weight_t, self.thr, self.splits, self.bias,
                                    norm, self.rms_mask, x.shape[-1], self.rms_eps, *self.lowrank_args())
        self._x, self._y = x, y
        self._x_version = -1 if torch.compiler.is_compiling() else x._version
        self._left = {j for j, g in enumerate(self.gates) if g.active}
        c0, c1 = self.shortcut_columns
        return y[..., c0:c1]

    def __call__(self, x: torch.Tensor, gate: GatedLinear) -> torch.Tensor | None:
        batched = x.numel() != gate.in_features
        if batched and _decode_rows(x) <= self.sparse_batch:
            return None  # prompts (and gated batches): the masking reference (cuBLAS)
        i = self.index[id(gate)]
        if not torch.compiler.is_compiling():  # a compiled step reads thr as refreshed before it ran
            if self.stale():
                self.repack()
            if not batched:
                self.refresh()
        if len(self.gates) == 1 and self.shortcut is None:
            return self._compensated(gate, x, self._run(x, batched, self.weight_t, self.thr, gate.splits, gate.bias),
                                     batched)
        c0, c1 = self.columns[i]
        # (while torch.compile traces, the version counter is not readable: identity within one trace)
        if self._x is x and i in self._left and (torch.compiler.is_compiling() or self._x_version == x._version):
            y = self._y
            self._left.discard(i)
        else:
            if self.shortcut is None:
                y = self._run(x, batched, self.weight_t, self.thr, self.splits, self.bias)
            else:
                y = self._run(x, batched, *self._members)
            self._x, self._y = x, y
            self._x_version = -1 if torch.compiler.is_compiling() else x._version
            self._left = {j for j, g in enumerate(self.gates) if g.active and j != i}
        if not self._left:  # every member served: drop the references
            self._x = self._y = None
        return self._compensated(gate, x, y[..., c0:c1], batched)

    def _run(self, x, batched: bool, weight_t, thr, splits, bias) -> torch.Tensor:
        """The group's output columns: the gated GEMV for one token (with the low-rank term of packed
        factors), one dense product over the packed ``W^T`` for a batched decode step (the members'
        matrices in one cuBLAS call; dense, so nothing to compensate)."""
        if batched:
            y = torch.matmul(x, weight_t)
            return y if bias is None else y + bias
        return launch.gated_linear_op(x, weight_t, thr, splits, bias, None, 0, 1, 0.0, *self.lowrank_args())

    def _compensated(self, gate: GatedLinear, x: torch.Tensor, y: torch.Tensor, batched: bool) -> torch.Tensor:
        """``y``, with the gate's low-rank term added by torch ops unless the launch added it (packed)."""
        return y if self.lr_b is not None else compensated(gate, x, y, batched)


def _decode_rows(x: torch.Tensor) -> int:
    """Sequences of a one-position decode input ``[B, 1, in]`` (0 for a prompt of several positions)."""
    return int(x.shape[0]) if x.dim() == 3 and x.shape[1] == 1 else 0


def set_sparse_batch(control: WinaControl, rows: int) -> None:
    """Decode steps of up to ``rows`` sequences are gated; larger batches run dense (on the kernel path).

    ``rows=1`` (the default) gates batch-1 decoding only; a large value gates every batch through the
    masking reference, which is slower than dense on the GPUs measured.
    """
    if rows < 1:
        raise ValueError(f"sparse_batch must be at least 1, got {rows}")
    from .quant_hook import QuantSharedInput

    for gate in control.gates.values():
        if isinstance(gate.kernel, (SharedInput, QuantSharedInput)):
            gate.kernel.sparse_batch = int(rows)
    control.context.epoch += 1


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
    if not triton_available(gates[0].weight.device):
        return False
    bind_kernels(control, groups)
    return True


def bind_kernels(control: WinaControl, groups: list[list[str]] | None = None) -> list[SharedInput]:
    """Pack the weights group by group and set every gate's ``kernel`` hook (any device; tests use CPU,
    where ``launch.gated_linear`` computes with torch)."""
    if groups is None:
        groups = [[name] for name in control.gates]
    # A centered gate (convert --center) gates x - c, which the kernels do not take: it keeps the masking
    # reference (cuBLAS) and is left out of every launch.
    usable = {n: g for n, g in control.gates.items() if g.center is None}
    named = [[usable[n] for n in group if n in usable] for group in groups]
    covered = {id(g) for group in named for g in group}
    named += [[g] for g in usable.values() if id(g) not in covered]
    # quantized gates (``GatedLinear.quant``) take the quantized kernels' launches (kernels/quant_hook.py)
    from .quant_hook import bind_quantized

    quant_groups = bind_quantized([[g for g in group if getattr(g, "quant", None) is not None] for group in named])
    named = [[g for g in group if getattr(g, "quant", None) is None] for group in named]
    bound = []
    widest = max([g.quant.out_features * 8 for g in quant_groups], default=0)  # up to 8 rows' partial sums
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
        launch.reserve_workspace(device, widest)
    return bound


def fuse_shortcuts(layers, adapter) -> int:
    """Pack each transformed layer's two shortcut rotations into the launches of its attention inputs and
    MLP inputs (``SharedInput.add_shortcut``), after ``bind_kernels``. A layer is left as it is unless both
    groups are bound and its norms are RMSNorms without weight (checked on a random vector). Returns the
    number of layers fused."""

    fused, widest, device = 0, 0, None
    for layer in layers:
        if not isinstance(layer, WinaDecoderLayer) or layer.fused is not None:
            continue
        pairs = []
        for inputs, norm_name, shortcut in ((adapter.attn_inputs, adapter.attn_norm, layer.attn_shortcut),
                                            (adapter.mlp_inputs, adapter.mlp_norm, layer.mlp_shortcut)):
            gates = [layer.get_submodule(n) for n in inputs]
            group = getattr(gates[0], "kernel", None)
            eps = _plain_rms_eps(layer.get_submodule(norm_name))
            if (not isinstance(group, SharedInput) or group.shortcut is not None or eps is None
                    or [id(g) for g in group.gates] != [id(g) for g in gates]
                    or shortcut.weight.dtype != group.weight_t.dtype or shortcut.in_features != group.thr.shape[1]):
                break
            pairs.append((group, shortcut, eps))
        else:
            for group, shortcut, eps in pairs:
                group.add_shortcut(shortcut, eps)
                widest, device = max(widest, group.weight_t.shape[1]), group.weight_t.device
            layer.fused = (pairs[0][0], pairs[1][0])
            fused += 1
    if device is not None and device.type == "cuda":
        launch.reserve_workspace(device, widest)
    return fused


def _plain_rms_eps(norm: nn.Module) -> float | None:
    """The epsilon of ``norm`` if it computes ``h / sqrt(mean(h^2) + eps)`` (its weight all ones), else None."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if not isinstance(eps, float) or weight is None or weight.dim() != 1:
        return None
    with torch.no_grad():
        if not bool((weight == 1).all()):
            return None
        h = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3
        want = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps))
        got = norm(h).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=2e-2, atol=1e-2):
            return None
    return eps


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
    control.context.epoch += 1
