"""``--allocation output``: how the model's sparsity is shared among its layers, judged by the model's output.

Per-layer calibration (``calibrator.py``) shares each layer's sparsity among its matrices greedily
but puts every layer at the same level. Layers are not equally sensitive (in small models the first
ones least tolerate sparsity), so after calibration this search moves sparsity between layers,
keeping the model's size-weighted level. The judge is the KL divergence of the gated model's
next-token distributions from the dense model's, per token, on ``SEARCH_TOKENS`` calibration tokens:

1. Every layer at the target gives ``base``; each layer ``l`` alone at the target plus ``PROBE`` (the
   rest at the target) gives ``sens_l = (KL_l - base) / PROBE``, floored at ``FLOOR`` times the
   median (a probe is noisy, and a layer that seems free must not take everything). The layers below
   ``l`` are unchanged by its probe, so they are replayed from the base run, not re-run (``_Replay``).
2. Candidate allocations put layer ``l`` at ``T - beta * (ln sens_l - mean ln sens)``: a layer ``e``
   times as sensitive as the average gives up ``beta`` of sparsity (the optimum of ``sum_l sens_l
   f(s_l)`` when ``f' ~ exp(s / beta)``); the levels are clipped to ``[0, MAX_SPARSITY]`` and shifted
   back to the model's level (``balanced``). Each ``beta`` of ``BETAS`` is judged by the whole model's
   KL; ``beta = 0`` (every layer at the target) is among them, so on the search tokens the result is
   never worse than the per-layer allocation.
3. The quantile tables were measured with every upstream layer at the target, so at the chosen levels
   the thresholds skip a little less or more than planned: the model's level is scaled (two fixed-point
   steps, counted on the search tokens) until the target's bytes are skipped.
4. The result is a whole-model allocation (``allocation_scope: "model"``): at a model level ``m``
   layer ``l`` sits at ``balanced(m * scale * r_l)`` (``r_l`` its chosen level over the model's) and its
   matrices at its own greedy allocation there, so any sparsity asked at load time keeps the proportions.

Cost: about ``layers / 2 + len(BETAS) + 4`` forwards of ``search_tokens`` tokens (default ``SEARCH_TOKENS``, 512; plus the dense one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..defaults import SEARCH_TOKENS  # calibration tokens on which the divergences are measured
from ..gate import ALLOCATION_LEVELS, MAX_SPARSITY

PROBE = 0.1  # sparsity added to one layer to measure its sensitivity
BETAS = (0.0, 0.0125, 0.025, 0.0375, 0.05, 0.075)  # sparsity given up per e-fold of relative sensitivity
FLOOR = 0.1  # a layer's sensitivity is at least this fraction of the median layer's (a probe is noisy)


class _Replay(nn.Module):
    """Stands in for a decoder layer whose output on the current sequence is known: returns it."""

    def __init__(self, outputs: list[Any]):
        super().__init__()
        self.outputs = outputs
        self.row = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.row]


class _Divergence:
    """KL(dense || gated) of the next-token distributions on the search tokens, per token, with the
    decoder layers below a given one replayed from the last full run (they are unchanged)."""

    def __init__(self, model: Any, tokens: torch.Tensor, layers: nn.ModuleList):
        self.model, self.tokens, self.layers = model, tokens.to(model.device), layers
        self.outputs: list[list[Any]] = [[None] * len(tokens) for _ in layers]
        self.handles = []
        self.dense = []
        self.keep_outputs = False
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._recorder(index)))

    def _recorder(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.keep_outputs:
                self.outputs[index][self.row] = output
        return hook

    def logprobs(self, row: int) -> torch.Tensor:
        self.row = row
        logits = self.model(input_ids=self.tokens[row : row + 1], use_cache=False).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def record_dense(self) -> None:
        with torch.no_grad():
            self.dense = [self.logprobs(row) for row in range(len(self.tokens))]

    def __call__(self, start: int = 0, record: bool = False) -> float:
        """Mean KL over the search tokens; layers below ``start`` replayed; ``record``: keep every layer's output."""
        originals = [self.layers[i] for i in range(start)]
        replays = [_Replay(self.outputs[i]) for i in range(start)]
        for i, replay in enumerate(replays):
            if hasattr(originals[i], "attention_type"):  # some transformers versions pick the mask by it
                replay.attention_type = originals[i].attention_type
            self.layers[i] = replay
        self.keep_outputs = record
        total = 0.0
        try:
            with torch.no_grad():
                for row in range(len(self.tokens)):
                    for replay in replays:
                        replay.row = row
                    logp = self.logprobs(row)
                    dense = self.dense[row]
                    total += float((dense.exp() * (dense - logp)).sum())
        finally:
            for i, original in enumerate(originals):
                self.layers[i] = original
            self.keep_outputs = False
        return total / self.tokens.numel()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def balanced(ratios: torch.Tensor, weights: torch.Tensor, level: float) -> torch.Tensor:
    """Per-layer levels ``clip(level * ratios + shift, 0, MAX_SPARSITY)`` whose ``weights``-weighted mean is ``level``."""
    if level <= 0:
        return torch.zeros_like(ratios)
    base = level * ratios
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float(((base + mid).clamp(0.0, MAX_SPARSITY) * weights).sum() / weights.sum())
        lo, hi = (mid, hi) if mean < level else (lo, mid)
    return (base + (lo + hi) / 2).clamp(0.0, MAX_SPARSITY)


def search_layer_levels(model: Any, tokens: torch.Tensor, target: float, layers_prefix: str,
                        search_tokens: int = SEARCH_TOKENS) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Choose per-layer levels for ``model`` (loaded, per-layer calibrated at ``target``) on the first
    ``search_tokens`` of ``tokens`` (whole windows, at least one).

    Returns the whole-model allocation (one ``[len(ALLOCATION_LEVELS), gates]`` tensor per layer) and a
    report: the divergences measured, the sensitivities, the ``beta`` chosen and the layers' levels at the target.
    """
    ctl = model.wina
    ctl.set_counting(False)
    count = len(ctl.layers)
    weights = torch.tensor(ctl.gated_bytes, dtype=torch.float64)
    level = target + dataclasses.replace(ctl.budget, scope="model").extra_at(0)  # the model's matrix level at the target
    rows = max(1, min(tokens.shape[0], search_tokens // tokens.shape[1]))
    divergence = _Divergence(model, tokens[:rows], model.get_submodule(layers_prefix))

    def gate(levels: torch.Tensor) -> None:
        sparsities: dict[str, torch.Tensor] = {}
        for layer in range(count):
            sparsities.update(ctl.layer_sparsities(layer, float(levels[layer])))
        ctl.set_gate_sparsities(sparsities)

    try:
        ctl.set_gate_sparsities(ctl.gate_sparsities(0.0))
        divergence.record_dense()
        uniform = torch.full((count,), level, dtype=torch.float64)
        gate(uniform)
        base = divergence(record=True)
        probes = []
        for layer in range(count):
            levels = uniform.clone()
            levels[layer] = min(level + PROBE, MAX_SPARSITY)
            gate(levels)
            probes.append(divergence(start=layer))
        sens = torch.tensor([(p - base) / PROBE for p in probes], dtype=torch.float64)
        sens = sens.clamp_min(max(FLOOR * float(sens.median()), 1e-9))
        z = sens.log() - float((sens.log() * weights).sum() / weights.sum())
        tried = []
        for beta in BETAS:
            levels = balanced((level - beta * z) / level, weights, level)
            gate(levels)
            tried.append((divergence(), beta, levels))
        best_kl, best_beta, best_levels = min(tried, key=lambda t: (t[0], t[1]))
        ratios = best_levels / level
        # The quantile tables were measured with every layer upstream at the target; at other levels the
        # thresholds are a little off. Scale the model's level so that the search tokens skip the target's bytes.
        scale = 1.0
        for _ in range(2):
            gate(balanced(ratios, weights, min(level * scale, MAX_SPARSITY)))
            achieved = _bytes_skipped(ctl, divergence)
            scale *= 1.0 + (target - achieved) / max(level, 1e-6)
    finally:
        divergence.close()
    allocation = []
    for layer in range(count):
        rows_ = []
        for m in ALLOCATION_LEVELS.tolist():
            at = float(balanced(ratios, weights, min(m * scale, MAX_SPARSITY))[layer]) if m > 0 else 0.0
            rows_.append(torch.cat(list(ctl.layer_sparsities(layer, at).values())))
        allocation.append(torch.stack(rows_).float())
    at_target = balanced(ratios, weights, min(level * scale, MAX_SPARSITY))
    by_role: dict[str, list[float]] = {}
    for layer in range(count):
        for name, per_matrix in ctl.layer_sparsities(layer, float(at_target[layer])).items():
            splits = torch.tensor(ctl.gates[name].splits, dtype=torch.float64)
            by_role.setdefault(name.rsplit(".", 1)[-1], []).append(float((per_matrix * splits).sum() / splits.sum()))
    report = {
        "by_role": {role: sum(v) / len(v) for role, v in by_role.items()},
        "search_tokens": int(rows * tokens.shape[1]),
        "base_kl": round(base, 6),
        "probe": PROBE,
        "sensitivity": [round(float(s), 5) for s in sens],
        "betas": {f"{beta:g}": round(kl, 6) for kl, beta, _ in tried},
        "beta": best_beta,
        "kl": round(best_kl, 6),
        "level_scale": round(scale, 5),
        "layer_levels": [round(float(v), 4) for v in at_target],
    }
    return allocation, report


def search_layers(model: Any, tokens: torch.Tensor, target: float, sidecar: dict[str, torch.Tensor],
                  search_tokens: int = SEARCH_TOKENS) -> Any:
    """``--allocation output`` on a converted model (per-layer calibrated at ``target``): search its layers' levels
    and return the record with the whole-model allocation; the allocation joins ``sidecar`` and the model gates by it."""
    ctl = model.wina
    allocation, report = search_layer_levels(model, tokens, target, ctl.layers_prefix, search_tokens)
    for layer, alloc in enumerate(allocation):
        sidecar[f"{ctl.layers_prefix}.{layer}.allocation"] = alloc
    by_role = report.pop("by_role")
    calibration = {**ctl.record.calibration, "allocation": "output", "search": report, "report": by_role}
    record = dataclasses.replace(ctl.record, allocation_scope="model", calibration=calibration)
    ctl.adopt(record, allocation)
    return record


def _bytes_skipped(ctl: Any, divergence: _Divergence) -> float:
    """The fraction of the gated sub-blocks' bytes the model skips as gated now, counted over ``divergence``'s
    tokens (one forward per window, no log-softmax over the vocabulary)."""
    ctl.set_counting(True)
    ctl.reset_stats()
    with torch.no_grad():
        for row in range(len(divergence.tokens)):
            divergence.model(input_ids=divergence.tokens[row : row + 1], use_cache=False)
    achieved = 1.0 - ctl.stats()["kept_bytes_fraction"]
    ctl.set_counting(False)
    return achieved


HEAD_SHARES = (0.0, 0.4, 0.8, 1.2, 1.6)  # candidate head levels per unit of model sparsity (--head-sparsity auto)
HEAD_REFINE = 0.2  # then the midpoints this far either side of the best


def search_head_share(model: Any, tokens: torch.Tensor, target: float, layers_prefix: str,
                      search_tokens: int = SEARCH_TOKENS) -> tuple[float, dict[str, Any]]:
    """``--head-sparsity auto``: how much of the target's bytes the output head should skip instead of the layers.

    ``model`` is loaded with its head gate calibrated. A share ``r`` gates the head at ``r * target`` and lowers
    the layers' level by the bytes it saves (``control.head_offset``), so every candidate reads the same bytes;
    each is judged by the whole model's KL divergence from the dense model on the search tokens (share 0, a
    dense head, is among them). Candidates whose head would skip more than ``MAX_SPARSITY`` or whose layers would
    go dense are left out. The layers' level is then scaled (``level_scale``, ``_fit_level_scale``, counted on
    the search tokens) until the target's bytes are skipped; convert fits it again once the head's gate is
    recalibrated for the chosen share (``fit_head_level_scale``). Returns the best share and a report.
    """
    ctl = model.wina
    ctl.set_counting(False)
    plain = ctl.budget
    rows = max(1, min(tokens.shape[0], search_tokens // tokens.shape[1]))
    divergence = _Divergence(model, tokens[:rows], model.get_submodule(layers_prefix))
    tried: dict[float, float] = {}

    def judge(share: float) -> None:
        share = round(share, 4)
        if share in tried or share < 0 or share * target > MAX_SPARSITY:
            return
        budget = plain.with_head(share=share)
        if share > 0 and budget.matrix_level(0, target) <= 0:
            return
        ctl.budget = budget
        ctl.set_sparsity(target)
        tried[share] = divergence()

    try:
        ctl.set_sparsity(0.0)
        divergence.record_dense()
        for share in HEAD_SHARES:
            judge(share)
        best = min(tried, key=lambda s: (tried[s], s))
        for share in (best - HEAD_REFINE, best + HEAD_REFINE):
            judge(share)
        best = min(tried, key=lambda s: (tried[s], s))
        ctl.budget = plain.with_head(share=best)
        scale, trail = _fit_level_scale(ctl, divergence, target) if best > 0 else (1.0, [])
    finally:
        divergence.close()
        ctl.budget = plain
        ctl.set_sparsity(0.0)
    report = {"search_tokens": int(rows * tokens.shape[1]), "shares": {f"{s:g}": round(kl, 6) for s, kl in sorted(tried.items())},
              "share": best, "kl": round(tried[best], 6), "level_scale": round(scale, 5), "skipped": trail}
    return best, report


def fit_head_level_scale(model: Any, tokens: torch.Tensor, target: float, layers_prefix: str,
                         search_tokens: int = SEARCH_TOKENS) -> tuple[float, list[float]]:
    """The layers' level scale of a model loaded with its in-budget head (``head_share``) and that head's final
    gate: the scale at which the calibration tokens (``LEVEL_SCALE_TOKENS`` of them at least) skip the target's
    bytes. Returns it and the bytes skipped at each scale tried (``_fit_level_scale``)."""
    ctl = model.wina
    ctl.set_counting(False)
    rows = max(1, min(tokens.shape[0], max(search_tokens, LEVEL_SCALE_TOKENS) // tokens.shape[1]))
    divergence = _Divergence(model, tokens[:rows], model.get_submodule(layers_prefix))
    try:
        return _fit_level_scale(ctl, divergence, target)
    finally:
        divergence.close()
        ctl.set_sparsity(0.0)


# calibration tokens the final fit counts on (at least; the search's own tokens if more): one 512-token window
# left Gemma-3-270M 0.019 over the target on held-out text, a counting pass is one forward per window
LEVEL_SCALE_TOKENS = 2048
LEVEL_SCALE_STEPS = 4  # at most this many counting passes to fit the layers' level scale
LEVEL_SCALE_TOLERANCE = 0.002  # of the target's bytes, on the tokens counted


def _fit_level_scale(ctl: Any, divergence: _Divergence, target: float) -> tuple[float, list[float]]:
    """The layers' tables were measured with every layer upstream at the target; below it (the head skipping part
    of the bytes) they skip less, or more, than planned. Scale the layers' level until ``divergence``'s tokens skip
    the target's bytes: a proportional step per counting pass, stopping within ``LEVEL_SCALE_TOLERANCE`` (the scale
    returned is then the last one measured) or after ``LEVEL_SCALE_STEPS`` passes."""
    budget, trail = ctl.budget, []
    scale = budget.head_level_scale
    for _ in range(LEVEL_SCALE_STEPS):
        ctl.budget = dataclasses.replace(budget, head_level_scale=scale)
        ctl.set_sparsity(target)
        achieved = _bytes_skipped(ctl, divergence)
        trail.append(round(achieved, 5))
        if abs(target - achieved) <= LEVEL_SCALE_TOLERANCE:
            break
        scale *= 1.0 + (target - achieved) / max(ctl.matrix_level(0, target), 1e-6)
    return scale, trail
