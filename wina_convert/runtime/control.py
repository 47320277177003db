"""``model.wina``: a sidecar turned into thresholds at any sparsity, the swaps that make a model sparse, counters.

Sidecar tensors (all float32), for every gated linear ``M`` (full module name) with ``P`` stacked
matrices (1, or 3 for a fused qkv_proj); the record (``checkpoint/format.py``, ``WinaRecord``) names the
levels they are tabulated at:

* ``M.column_norms``  ``[P, in]``  ``||W[:, i]||`` of each matrix, the WINA weights;
* ``M.quantiles``     ``[P, Q]``   score quantiles at ``record.quantile_levels`` (after calibration);
* ``{layer}.allocation`` ``[A, G]`` the sparsity of each of the layer's ``G`` gates when the layer's matrices
  as a whole are at ``record.allocation_levels[a]`` (the model's level, for a whole-model allocation);
* ``M.center``        ``[in]``     the calibrated center of the gate's input (``convert --center``), if any;
* ``lm_head.column_norms`` / ``lm_head.quantiles``: the output head's gate (``record.head``), in the budget or on top;
* ``M.lowrank_a``     ``[out, r]`` and ``M.lowrank_b`` ``[P, r, in]``: the factors that compensate the dropped
  channels (``convert --lowrank``, ``wina_convert/lowrank.py``), if any.

Which level each layer and the head sit at for a model sparsity is ``budget.py``'s rule (``Budget``). The
threshold of a matrix at its sparsity ``s`` is the ``s``-quantile ``t`` of its scores; the per-channel threshold
is ``t / column_norms`` for WINA (``|x_i| c_i > t``) and ``t`` for TEAL (``gate.thresholds_at``, the rule
calibration uses too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import Adapter
from ..budget import Budget
from ..checkpoint.format import WinaRecord
from ..errors import WinaError
from ..gate import MAX_SPARSITY, fraction, interp, thresholds_at
from .modules import GateContext, GatedLinear


@dataclass
class GateTable:
    """Everything needed to derive one gated linear's thresholds at any sparsity."""

    module: str
    column_norms: torch.Tensor  # [P, in]
    quantiles: torch.Tensor | None  # [P, Q]

    def thresholds(self, sparsities: torch.Tensor, levels: torch.Tensor, method: str) -> torch.Tensor:
        """Per-channel thresholds ``[P, in]`` for the per-matrix sparsities ``[P]``."""
        rows = []
        for p, s in enumerate(sparsities.tolist()):
            if s > 0 and self.quantiles is None:
                raise WinaError("this checkpoint is not calibrated: only sparsity 0 is available (convert with calibration)")
            quantiles = self.quantiles[p] if s > 0 else None
            rows.append(thresholds_at(quantiles, self.column_norms[p], s, method, levels))
        return torch.stack(rows)


def gate_modules(adapter: Adapter, num_layers: int) -> list[list[str]]:
    """The full names of the gated linears, per layer."""
    return [[adapter.layer_key(layer, name) for name in adapter.gated_linears()] for layer in range(num_layers)]


def swap_gated_linears(model: nn.Module, modules: list[str], splits: dict[str, list[int]],
                       context: GateContext | None = None) -> dict[str, GatedLinear]:
    """Replace each named ``nn.Linear`` by a ``GatedLinear`` sharing its parameters (and ``context``)."""
    swapped = {}
    context = context or GateContext()
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        gated = linear if isinstance(linear, GatedLinear) else GatedLinear(linear, splits[name], context)
        setattr(parent, child, gated)
        swapped[name] = gated
    return swapped


class WinaControl:
    """``model.wina``: choose the sparsity, count what the gates zero, report it.

    ``set_sparsity(s)`` derives every gate's thresholds from the sidecar (any ``s`` in
    [0, 0.9], no recalibration); ``stats()`` gives the fraction of inputs zeroed per gate and the
    parameter-weighted total since ``reset_stats()``.
    """

    def __init__(self, gates: dict[str, GatedLinear], tables: dict[str, GateTable], allocation: list[torch.Tensor | None],
                 layers: list[list[str]], record: WinaRecord):
        self.gates = gates
        self.tables = tables
        self.allocation = allocation
        self.layers = layers
        self.record = record
        self.method = record.method
        self.quantile_levels = torch.tensor(record.quantile_levels or [0.0, 1.0], dtype=torch.float64)
        self.allocation_levels = torch.tensor(record.allocation_levels or [0.0, 1.0], dtype=torch.float64)
        self.sparsity = 0.0
        self.context = next(iter(gates.values())).context if gates else GateContext()
        self.layers_prefix = "model.layers"  # set by load (the adapter's)
        self.checkpoint_config: dict[str, Any] | None = None  # the config.json it was loaded from (for saving)
        self.topk = False
        # bytes, as stored (a quantized matrix's codes, scales and offsets: convert --weights)
        self.gated_bytes = [sum(gates[n].weight_bytes for n in names) for names in layers]
        if record.extra_fraction and len(record.extra_fraction) != len(layers):
            raise WinaError(f"the sidecar's extra_fraction has {len(record.extra_fraction)} layers, the weights {len(layers)}")
        self._read_budget()
        self.extra_bytes = [e * m for e, m in zip(self.budget.extra, self.gated_bytes)]
        # the part of extra_bytes that is low-rank factors (as loaded; the rest is shortcut rotations)
        self.factor_bytes = [sum(gates[n].lowrank_params * gates[n].weight.element_size() for n in names) for names in layers]

    def _read_budget(self) -> None:
        """The gated output head (if any) and the budget, from ``self.record``."""
        self.head: str | None = self.record.head if self.record.head in self.gates else None
        head_bytes = self.gates[self.head].weight_bytes if self.head else 0
        record = self.record if self.head else dataclasses.replace(self.record, head=None)
        self.budget = Budget.of(record, self.gated_bytes, head_bytes)

    def adopt(self, record: WinaRecord, allocation: list[torch.Tensor] | None = None) -> None:
        """Gate by ``record`` (and ``allocation``) from now on, at the current sparsity: what ``wina convert``'s
        searches chose, applied to the model they searched on."""
        self.record = record
        if allocation is not None:
            self.allocation = list(allocation)
        self._read_budget()
        self.set_sparsity(self.sparsity)

    @property
    def epoch(self) -> int:
        """Bumped when any of this model's gates changes thresholds (its decode graphs are stale then)."""
        return self.context.epoch

    def sidecar_tensors(self) -> dict[str, torch.Tensor]:
        """The sidecar's tensors as loaded (column norms, quantile tables, centers, allocations), to save again."""
        out = {}
        for name, table in self.tables.items():
            out[f"{name}.column_norms"] = table.column_norms
            if table.quantiles is not None:
                out[f"{name}.quantiles"] = table.quantiles
            center = self.gates[name].center
            if center is not None:
                out[f"{name}.center"] = center.float()
            gate = self.gates[name]
            if gate.lowrank_a is not None:
                out[f"{name}.lowrank_a"] = gate.lowrank_a.float().cpu()
                out[f"{name}.lowrank_b"] = gate.lowrank_b.float().cpu()
        for layer, alloc in enumerate(self.allocation):
            if alloc is not None:
                out[f"{self.layers_prefix}.{layer}.allocation"] = alloc
        return out

    def watch_padding(self, model: nn.Module) -> None:
        """Exclude padded positions from the counters: before each forward of ``model``, the real positions
        of its input (from the attention mask) are noted in the gates' shared context."""
        model.register_forward_pre_hook(self._note_positions, with_kwargs=True)
        model.register_forward_hook(self._forget_positions, always_call=True)

    def _note_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.context.valid = real_positions(mask, ids, kwargs.get("cache_position"))
        self.context.prefill = isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[1] > 1

    def _forget_positions(self, *args: Any) -> None:
        self.context.valid = None
        self.context.prefill = False

    def set_counting(self, enabled: bool) -> None:
        """Count dropped inputs (``stats``) or not; benchmarks of decode speed switch it off."""
        for gate in self.gates.values():
            gate.counting = enabled

    def matrix_level(self, layer: int, sparsity: float) -> float:
        """The size-weighted sparsity of ``layer``'s matrices at model sparsity ``sparsity`` (``Budget``)."""
        return self.budget.matrix_level(layer, sparsity)

    def head_level(self, sparsity: float) -> float:
        """The fraction of the output head's columns skipped at model sparsity ``sparsity`` (``Budget``)."""
        return self.budget.head_level(sparsity)

    @property
    def max_sparsity(self) -> float:
        """The highest byte sparsity whose matrix levels stay within the calibrated levels."""
        return self.budget.max_sparsity

    def use_budget(self, budget: Budget) -> None:
        """Gate by ``budget`` from now on (the searches try head settings this way), at the current sparsity."""
        self.budget = budget
        self.set_sparsity(self.sparsity)

    @property
    def target_sparsity(self) -> float:
        return float(self.record.target_sparsity or 0.0)

    @property
    def calibrated(self) -> bool:
        return all(t.quantiles is not None for t in self.tables.values())

    def layer_sparsities(self, layer: int, level: float) -> dict[str, torch.Tensor]:
        """Per gated linear of ``layer``, the sparsity of each stacked matrix when the layer's matrices are at
        ``level`` (their size-weighted mean, or the model's for a whole-model allocation), read off the
        layer's allocation."""
        alloc = self.allocation[layer]
        out, col = {}, 0
        for name in self.layers[layer]:
            parts = self.tables[name].column_norms.shape[0]
            if alloc is None or level <= 0:
                out[name] = torch.full((parts,), float(level), dtype=torch.float64)
            else:
                out[name] = interp(level, self.allocation_levels, alloc[:, col : col + parts].T.to(torch.float64))
            col += parts
        return out

    def gate_sparsities(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Per gated linear, the sparsity of each stacked matrix when the model is at ``sparsity``."""
        out = {}
        for layer in range(len(self.layers)):
            out.update(self.layer_sparsities(layer, self.matrix_level(layer, sparsity)))
        return out

    def set_gate_sparsities(self, sparsities: dict[str, torch.Tensor]) -> None:
        """Threshold each gated linear at the given per-matrix sparsities (top-k gating follows them too)."""
        for name, per_matrix in sparsities.items():
            gate = self.gates[name]
            if self.topk:
                keep = [round((1.0 - s) * gate.in_features) for s in per_matrix.tolist()]
                gate.set_topk(keep, self.tables[name].column_norms if self.method == "wina" else None)
            else:
                gate.set_topk(None)
                gate.set_thresholds(self.tables[name].thresholds(per_matrix, self.quantile_levels, self.method))

    def set_sparsity(self, sparsity: float | None = None) -> float:
        """Gate every linear for ``sparsity`` (None: the calibrated target). Returns it."""
        sparsity = fraction(self.target_sparsity if sparsity is None else sparsity, "sparsity")
        if sparsity > self.max_sparsity + 1e-9:
            raise WinaError(f"sparsity {sparsity} is above this checkpoint's maximum {self.max_sparsity}: its shortcut "
                            f"rotations or low-rank factors are read too, so its matrices would have to skip more than {MAX_SPARSITY}")
        if sparsity > 0 and not self.calibrated and not self.topk:
            raise WinaError("this checkpoint is not calibrated: only sparsity 0 is available (convert it with calibration)")
        sparsities = self.gate_sparsities(sparsity)
        if self.head is not None:
            sparsities[self.head] = torch.tensor([self.head_level(sparsity)], dtype=torch.float64)
        self.set_gate_sparsities(sparsities)
        self.sparsity = sparsity
        return sparsity

    def set_head_sparsity(self, sparsity: float) -> float:
        """Gate the output head at ``sparsity`` (its fraction of columns skipped) whenever the model is sparse.

        Needs a checkpoint converted with ``--head-sparsity`` (which calibrates the head's gate); 0 reads it densely.
        The head is then on top of the budget, also for a checkpoint whose head was in it (``head_share``).
        """
        sparsity = fraction(sparsity, "head sparsity")
        if self.head is None:
            if sparsity > 0:
                raise WinaError("this checkpoint's output head is not calibrated: convert it with --head-sparsity")
            return 0.0
        self.use_budget(self.budget.with_head(sparsity=sparsity))
        return sparsity

    def set_topk(self, enabled: bool) -> None:
        """Gate by per-token top-k (each token keeps its ``(1 - s_m) in`` best channels per matrix, at the
        same per-matrix sparsities ``s_m``) instead of calibrated thresholds; for evaluation, the
        paper's protocol. Applies to the current sparsity and to later ``set_sparsity`` calls."""
        self.topk = bool(enabled)
        self.set_sparsity(self.sparsity)

    def set_gate_prefill(self, enabled: bool) -> None:
        for gate in self.gates.values():
            gate.gate_prefill = enabled

    def reset_stats(self) -> None:
        for gate in self.gates.values():
            gate.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Achieved sparsity: per gate (by module name), per role, parameter-weighted overall, and bytes.

        ``kept_bytes_fraction`` is what the gated sub-blocks read per token (kept columns, plus the
        shortcut rotations read densely, plus the low-rank factors of the gates that are on) over their
        dense bytes; ``1 - kept_bytes_fraction`` is the byte sparsity that ``--sparsity`` asks for.
        """
        per_gate, by_role = {}, {}
        total_w = total_zero = 0.0
        kept_bytes = 0.0
        for layer, names in enumerate(self.layers):
            counted = [self.gates[n] for n in names if self.gates[n].tokens > 0]
            if not counted:
                continue
            kept = sum(((1 - g.zeroed.cpu().double() / (g.tokens * g.in_features)) * torch.tensor(g.splits, dtype=torch.float64)).sum().item()
                       * g.weight_bytes / g.out_features for g in counted)
            # the shortcuts are read at every step; a gate's factors only while it gates (off: dense, no term)
            shortcuts = self.extra_bytes[layer] - self.factor_bytes[layer]
            factors = sum(g.lowrank_params * g.weight.element_size() for g in counted if g.active)
            kept_bytes += kept + shortcuts + factors
        layered = {name: gate for name, gate in self.gates.items() if name != self.head}
        dense_bytes = sum(g.weight_bytes for g in layered.values() if g.tokens > 0)
        head = self.gates[self.head] if self.head is not None else None
        saved = 0.0  # the bytes an in-budget head skips per token: they count toward the sparsity
        if self.budget.in_budget and head.tokens > 0:
            saved = (head.zeroed.sum().item() / (head.tokens * head.in_features)) * head.weight_bytes
        counts = {name: (gate.zeroed.tolist(), gate.tokens) for name, gate in self.gates.items()}
        for name, gate in self.gates.items():
            zeroed, tokens = counts[name]
            if tokens == 0:
                continue
            fractions = [z / (tokens * gate.in_features) for z in zeroed]
            weights = [size * gate.in_features for size in gate.splits]
            zero = sum(f * w for f, w in zip(fractions, weights))
            per_gate[name] = zero / sum(weights)
            if name == self.head:  # reported apart: the head is not one of the gated sub-blocks
                continue
            role = name.rsplit(".", 1)[-1]
            acc = by_role.setdefault(role, [0.0, 0.0])
            acc[0] += zero
            acc[1] += sum(weights)
            total_zero += zero
            total_w += sum(weights)
        return {
            "sparsity": total_zero / total_w if total_w else 0.0,
            "by_role": {role: z / w for role, (z, w) in by_role.items()},
            "per_gate": per_gate,
            # bytes the gated sub-blocks read per token (kept weight columns + shortcuts; less what an in-budget
            # head skips), over their dense bytes
            "kept_bytes_fraction": (kept_bytes - saved) / dense_bytes if dense_bytes else 1.0,
            "gated_bytes_per_token": kept_bytes,
            "head": self._head_stats(per_gate),
        }

    def _head_stats(self, per_gate: dict[str, float]) -> dict[str, Any] | None:
        """The gated head's achieved sparsity and the bytes it read per token (None: no head gate, or not counted)."""
        if self.head is None or self.head not in per_gate:
            return None
        gate = self.gates[self.head]
        dense = gate.weight_bytes
        return {"sparsity": per_gate[self.head], "target": self.head_level(self.sparsity), "in_budget": self.budget.in_budget,
                "bytes_per_token": dense * (1.0 - per_gate[self.head]), "dense_bytes": dense}


def real_positions(mask: Any, ids: Any, cache_position: Any = None) -> torch.Tensor | None:
    """``[batch, positions]`` bool: which positions of this forward are real tokens, not padding.

    ``mask`` is transformers' attention mask: 2-D ``[batch, past + positions]`` (1 = real), or 4-D
    ``[batch, 1, positions, keys]`` (bool: True = attend; float: 0 = attend), or a dict of those per
    layer type. A real token always attends to itself, so in the 4-D form position ``q`` is real when
    its own key ``cache_position[q]`` is not masked. None (count everything) when it cannot tell.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return None
    batch, positions = ids.shape[0], ids.shape[1]
    if isinstance(mask, dict):
        mask = next((m for m in mask.values() if isinstance(m, torch.Tensor)), None)
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= positions:
        return mask[:, mask.shape[1] - positions:] != 0
    if mask.dim() == 4 and mask.shape[0] == batch and mask.shape[2] == positions and isinstance(cache_position, torch.Tensor):
        if cache_position.numel() != positions:
            return None
        keys = cache_position.reshape(1, 1, positions, 1).expand(batch, 1, positions, 1).to(mask.device)
        own = mask.gather(3, keys.clamp(max=mask.shape[3] - 1)).reshape(batch, positions)
        return own if own.dtype == torch.bool else own == 0
    return None
