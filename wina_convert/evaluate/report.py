"""Printing ``wina eval --tasks`` results: one rich table (dense | sparse per task, and the mean) or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _cell(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def task_table(result: dict[str, Any], title: str) -> Table:
    """Rows: tasks then the mean; columns: dense and sparse acc / acc_norm (percent ± stderr), items."""
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("items", justify="right")
    for side in ("dense", f"WINA @ {result['target_sparsity']:.2f}"):
        table.add_column(f"{side} acc", justify="right")
        table.add_column(f"{side} acc_norm", justify="right")
    for task in result["tasks"]:
        dense, sparse = result["dense"][task], result["sparse"][task]
        table.add_row(task, str(dense["samples"] or "-"),
                      _cell(dense["acc"], dense["acc_stderr"]), _cell(dense["acc_norm"], dense["acc_norm_stderr"]),
                      _cell(sparse["acc"], sparse["acc_stderr"]), _cell(sparse["acc_norm"], sparse["acc_norm_stderr"]))
    dense, sparse = result["dense"]["mean"], result["sparse"]["mean"]
    table.add_row("mean", "", _cell(dense["acc"]), _cell(dense["acc_norm"]), _cell(sparse["acc"]),
                  _cell(sparse["acc_norm"]), style="bold")
    table.caption = (f"protocol {result.get('protocol', 'all-tokens')}; "
                     f"achieved sparsity {100 * result['sparsity']:.1f}% (target {100 * result['target_sparsity']:.1f}%); "
                     f"mean acc_norm takes acc where a task has none; {result['seconds']:.0f} s")
    table.caption_justify = "left"
    return table


def print_task_report(checkpoint: str, tasks: str, *, limit: int | None, sparsity: float | None, device: str,
                      dtype: str | None, as_json: bool, protocol: str = "deployed") -> None:
    """Run the tasks on ``checkpoint`` and print the table (or one JSON object) on stdout."""
    from .tasks import evaluate_tasks

    result = evaluate_tasks(checkpoint, tasks, limit=limit, sparsity=sparsity, device=device, dtype=dtype,
                            protocol=protocol)
    if as_json:
        print(json.dumps(result, default=str))
        return
    limit_note = f", at most {limit} items per task" if limit else ""
    Console().print(task_table(result, f"{checkpoint}: zero-shot (lm-evaluation-harness){limit_note}"))
