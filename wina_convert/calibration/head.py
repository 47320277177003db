"""The output head's gate (``convert --head-sparsity``), calibrated and placed on the converted model in memory.

The head reads the final hidden states, so its gate is calibrated like a layer's (score quantiles of
``|x_i| c_i``) on those states, with the layers gated at the target as they will run. ``auto`` puts it inside
``--sparsity``'s bytes: its share of them is searched (``search.search_head_share``), the gate calibrated again
with the layers at their final level, and the layers' level scale fitted once more (``search.fit_head_level_scale``).
A fraction gates it on top of the budget instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..checkpoint.format import WinaRecord
from ..gate import MAX_SPARSITY, column_norms, score_quantiles
from .search import fit_head_level_scale, search_head_share

HEAD_TOKENS = 2048  # calibration tokens (whole windows) the output head's gate is calibrated on


def head_tables(model: Any, tokens: torch.Tensor, head: str, method: str,
                max_tokens: int = HEAD_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's column norms ``[1, in]`` and score quantiles ``[1, Q]`` on the final hidden states of ``model``
    as gated now, over whole windows of ``tokens`` (at least ``max_tokens`` tokens)."""
    weight = model.get_submodule(head).weight
    norms = column_norms(weight.detach(), [weight.shape[0]]).cpu()
    rows = max(1, min(len(tokens), -(-max_tokens // tokens.shape[1])))
    hidden = []
    with torch.no_grad():
        for start in range(0, rows, 4):
            out = model.get_decoder()(input_ids=tokens[start : min(start + 4, rows)].to(model.device))
            hidden.append(out.last_hidden_state.reshape(-1, weight.shape[1]).float())
    quantiles = score_quantiles(torch.cat(hidden), norms[0] if method == "wina" else None, torch.Generator().manual_seed(0))
    return norms, quantiles[None].float()


def gate_head(model: Any, adapter: Any, tokens: torch.Tensor, target: float, head_sparsity: float | str,
              sidecar: dict[str, torch.Tensor], search_tokens: int) -> WinaRecord:
    """Gate ``model``'s output head at ``head_sparsity`` (a fraction on top, or ``"auto"``: inside the budget) and
    return the record that says so; the head's tables join ``sidecar`` and the model gates by them."""
    from ..runtime.load import head_gate

    ctl = model.wina
    head = adapter.lm_head.removesuffix(".weight")
    auto = head_sparsity == "auto"
    ctl.set_sparsity(target)
    norms, quantiles = head_tables(model, tokens, head, ctl.method)
    sidecar[f"{head}.column_norms"], sidecar[f"{head}.quantiles"] = norms, quantiles
    head_gate(model, adapter, ctl.gates, ctl.tables, head, norms, quantiles)
    record = dataclasses.replace(ctl.record, head=head, head_sparsity=0.0 if auto else float(head_sparsity))
    ctl.adopt(record)
    if not auto:
        return record
    share, report = search_head_share(model, tokens, target, ctl.layers_prefix, search_tokens)
    record = dataclasses.replace(record, head_share=share, head_sparsity=min(share * target, MAX_SPARSITY),
                                 head_level_scale=report["level_scale"], calibration={**record.calibration, "head": report})
    ctl.adopt(record)
    if share > 0:  # the head's input, with the layers at their final level
        ctl.set_sparsity(target)
        _, quantiles = head_tables(model, tokens, head, ctl.method)
        sidecar[f"{head}.quantiles"] = ctl.tables[head].quantiles = quantiles
        ctl.adopt(record)
        scale, trail = fit_head_level_scale(model, tokens, target, ctl.layers_prefix, search_tokens)
        report = {**report, "level_scale": round(scale, 5), "skipped_final_gate": trail}
        record = dataclasses.replace(record, head_level_scale=scale, calibration={**record.calibration, "head": report})
        ctl.adopt(record)
    return record
