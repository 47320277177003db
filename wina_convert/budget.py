"""The byte budget, written once: at model sparsity ``s``, what each layer's matrices and the output head skip.

``--sparsity s`` is the fraction of the gated sub-blocks' decode bytes skipped. A layer also reads bytes
densely beside its gated matrices (a transform's two shortcut rotations, low-rank factors): ``e_l``, the
record's ``extra_fraction``, over its gated matrices' bytes. So the layer's matrices skip ``s + e_l`` of their
columns (their size-weighted *level*) and every layer reads ``1 - s`` of its dense bytes. A whole-model
allocation (``allocation_scope == "model"``, the layer search) pays for the extras together:
``s + sum_l e_l m_l / sum_l m_l``.

An output head gated *in the budget* (``head_share = r``) skips ``r s`` of its columns; what it saves, over the
gated sub-blocks' bytes (``head_offset``), is taken off every layer's level, and the result is scaled by
``head_level_scale`` (fitted by the searches: the tables were calibrated with every layer upstream at the
target). A head gated *on top* skips ``head_sparsity`` whenever the model is sparse, outside the budget.
Sparsity 0 is dense everywhere.

The runtime (``runtime/control.py``), ``wina inspect``, the searches and the model card all read levels here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .gate import MAX_SPARSITY


@dataclass(frozen=True)
class Budget:
    """The budget of one checkpoint: its record's budget fields and the sizes they weigh.

    ``gated`` holds each layer's gated matrices' sizes (parameters; only ratios matter), ``head_size`` the
    output head's. Use :meth:`with_head` to try another head setting: a budget is never changed in place.
    """

    extra: tuple[float, ...]
    gated: tuple[float, ...]
    scope: str = "layer"
    head_size: float = 0.0
    head_gated: bool = False
    head_sparsity: float = 0.0
    head_share: float | None = None
    head_level_scale: float = 1.0

    @classmethod
    def of(cls, record, gated: Sequence[float], head_size: float = 0.0) -> "Budget":
        """The budget of a :class:`~wina_convert.checkpoint.format.WinaRecord` for layers of sizes ``gated``."""
        extra = tuple(float(e) for e in (record.extra_fraction or [0.0] * len(gated)))
        head = record.head is not None
        return cls(extra, tuple(float(g) for g in gated), record.allocation_scope, float(head_size), head,
                   float(record.head_sparsity or 0.0) if head else 0.0,
                   None if not head or record.head_share is None else float(record.head_share),
                   float(record.head_level_scale or 1.0) if head and record.head_share is not None else 1.0)

    def with_head(self, *, share: float | None = None, sparsity: float | None = None, level_scale: float = 1.0,
                  gated: bool = True) -> "Budget":
        """This budget with the head in it at ``share`` (or on top at ``sparsity``; neither: dense)."""
        return replace(self, head_gated=gated, head_share=share, head_sparsity=0.0 if sparsity is None else sparsity,
                       head_level_scale=level_scale if share is not None else 1.0)

    @property
    def in_budget(self) -> bool:
        return self.head_gated and self.head_share is not None

    def extra_at(self, layer: int) -> float:
        if self.scope == "model":
            return sum(e * m for e, m in zip(self.extra, self.gated)) / sum(self.gated)
        return self.extra[layer]

    def head_level(self, sparsity: float) -> float:
        """The fraction of the head's columns skipped at model sparsity ``sparsity`` (0: dense or no head gate)."""
        if not self.head_gated or sparsity <= 0:
            return 0.0
        if self.head_share is not None:
            return min(self.head_share * sparsity, MAX_SPARSITY)
        return self.head_sparsity

    def head_offset(self, sparsity: float) -> float:
        """What an in-budget head saves at ``sparsity``, over the gated sub-blocks' bytes (0: on top, or none)."""
        if not self.in_budget:
            return 0.0
        return self.head_level(sparsity) * self.head_size / sum(self.gated)

    def matrix_level(self, layer: int, sparsity: float) -> float:
        """The size-weighted sparsity of ``layer``'s matrices at model sparsity ``sparsity``; 0 at 0 (dense)."""
        if sparsity <= 0:
            return 0.0
        level = sparsity + self.extra_at(layer)
        if not self.in_budget:
            return level
        return min(max(0.0, (level - self.head_offset(sparsity)) * self.head_level_scale), MAX_SPARSITY)

    @property
    def max_sparsity(self) -> float:
        """The highest sparsity whose matrix levels stay within the calibrated levels (``MAX_SPARSITY``)."""
        over = [self.matrix_level(layer, 1.0) - 1.0 for layer in range(len(self.gated))]
        return round(MAX_SPARSITY - max(over, default=0.0), 4)
