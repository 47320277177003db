"""``wina eval --tasks``: zero-shot accuracy, dense vs sparse, through lm-evaluation-harness.

The paper judges WINA by zero-shot accuracy (PIQA, ARC, HellaSwag, WinoGrande, BoolQ, LAMBADA,
MMLU). We score our own loaded model object with EleutherAI's lm-evaluation-harness (``lm-eval``,
the optional extra ``[eval]``): its ``HFLM`` wrapper around the transformers model that
``wina_convert.load`` returns, and its *stock* task configs (prompts, answer choices, metrics),
read from the installed ``lm_eval/tasks`` with lm-eval's own YAML loader. Only the data source is
replaced: each config's ``custom_dataset`` reads the local copy (``taskdata.py``), so nothing
touches the network.

A multiple-choice item with context ``c`` and choices ``a_i`` is scored by the log-likelihood
``ll_i = sum_t log p(a_i[t] | c, a_i[<t])`` of each choice's tokens: ``acc`` is the rate at
which ``argmax_i ll_i`` is the gold choice, ``acc_norm`` the same with ``ll_i / bytes(a_i)``
(lm-eval's length normalization); LAMBADA's ``acc`` is whether the last word is the greedy
continuation. Standard errors are lm-eval's: ``sqrt(p(1-p)/(n-1))`` for a task, pooled by size
for MMLU's 57 subjects (whose ``acc`` is the size-weighted mean, as lm-eval's ``mmlu`` group).

GSM8K (``gsm8k_cot``) is generative: lm-eval's stock ``gsm8k-cot`` config (the 8 chain-of-thought
exemplars are in the config, so only the test split is needed), greedy until a stop sequence;
``acc`` is its ``exact_match`` after the ``strict-match`` filter ("The answer is N."), and
``flexible`` the one after ``flexible-extract`` (the last number).

Dense and sparse are the same loaded model: ``model.wina.set_sparsity(0)``, then the target. Which
positions are gated is the ``protocol`` (``protocol.py``): ``deployed`` (the default) gates what a
generation would gate (an item's context dense, its continuation tokens gated; a generated answer's
prompt dense, its tokens gated), ``all-tokens`` gates every token, prompts too, as the papers measure.
The achieved sparsity is counted over the gated positions of the sparse pass. With ``batch_size > 1``
under ``all-tokens`` lm-eval right-pads a batch, and the padded positions are gated and counted too
(the scores are unaffected: attention is causal), so the default is 1.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import WinaError
from .protocol import ALL_TOKENS, DEPLOYED, check_protocol, deployed_lm_class
from .taskdata import TASKS, data_root, load_task_splits, missing_data_error, mmlu_subjects

EXTRA_HINT = "pip install 'wina-convert[eval]'"
BOOTSTRAP_ITERS = 1000  # only for non-mean metrics (LAMBADA perplexity); acc's stderr is closed-form

# task -> its stock config, relative to the installed lm_eval/tasks (MMLU: one file per subject)
STOCK_CONFIGS = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "mmlu": "mmlu/default/mmlu_{subject}.yaml",
    "gsm8k_cot": "gsm8k/gsm8k-cot.yaml",
}
# generative tasks whose few-shot exemplars are part of the stock config: their num_fewshot is kept
FEWSHOT_IN_CONFIG = {"gsm8k_cot"}
GENERATIVE = {"gsm8k_cot": "exact_match"}  # task -> its metric (per filter: strict-match -> acc, flexible-extract)


def parse_tasks(spec: str | list[str]) -> list[str]:
    """Task names from ``"piqa,arc_easy"`` (or a list), validated, in order, without repeats."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise WinaError(f"--tasks is empty: choose from {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            raise WinaError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise WinaError(f"zero-shot tasks need lm-evaluation-harness: {EXTRA_HINT}") from None
    return lm_eval


def _splits(task: str, root: Path, **_: Any) -> Any:
    """lm-eval's ``custom_dataset`` hook (called with the config's metadata, ignored)."""
    return load_task_splits(task, root)


def stock_config(task: str, root: Path, subject: str | None = None) -> dict[str, Any]:
    """lm-eval's own config of ``task`` (includes and ``!function`` resolved), reading from ``root``."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.__file__).parent / "tasks" / STOCK_CONFIGS[task].format(subject=subject)
    if not path.is_file():
        raise WinaError(f"lm-eval {getattr(lm_eval, '__version__', '?')} has no stock config {path.name} "
                        f"for {task}: install the tested version ({EXTRA_HINT})")
    config = load_yaml(path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    local = f"mmlu/{subject}" if subject else task
    present = {p.name for p in (root / local).iterdir()} if (root / local).is_dir() else set()
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in present:  # e.g. no train split: zero-shot never reads it
            config[key] = None
    config["custom_dataset"] = functools.partial(_splits, local, root)
    config["dataset_path"] = str(root / local)  # informational: custom_dataset does the reading
    config["dataset_name"] = None
    if task not in FEWSHOT_IN_CONFIG:
        config["num_fewshot"] = 0
    return config


def task_specs(tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """lm-eval inline specs: one task config each; MMLU as its 57 subjects' configs (``mmlu_<subject>``),
    aggregated by ``_mmlu_scores`` (lm-eval 0.4.13 leaks an inline group's keys into its members)."""
    specs = []
    for task in tasks:
        if task == "mmlu":
            subjects = mmlu_subjects(root)
            if not subjects:
                raise missing_data_error(root)
            specs.extend(stock_config("mmlu", root, s) for s in subjects)
        else:
            specs.append(stock_config(task, root))
    return specs


def _mmlu_scores(results: dict[str, Any], samples: dict[str, int]) -> dict[str, Any]:
    """MMLU as lm-eval's ``mmlu`` group reports it: ``acc`` the size-weighted mean over subjects, its
    stderr pooled over all items (``sqrt(p(1-p)/(n-1))`` of the pooled items); no acc_norm."""
    subjects = [name for name in results if name.startswith("mmlu_")]
    sizes = {name: samples.get(name, 0) for name in subjects}
    total = sum(sizes.values())
    if not total:
        return {"acc": None, "acc_stderr": None, "acc_norm": None, "acc_norm_stderr": None, "samples": 0}
    acc = sum(float(results[name]["acc,none"]) * n for name, n in sizes.items()) / total
    stderr = (acc * (1 - acc) / (total - 1)) ** 0.5 if total > 1 else None
    return {"acc": acc, "acc_stderr": stderr, "acc_norm": None, "acc_norm_stderr": None, "samples": total,
            "subjects": len(subjects)}


def _scores(results: dict[str, Any], task: str, samples: dict[str, int]) -> dict[str, Any]:
    """acc, acc_norm (None where the task has none), their stderrs, and the sample count of one task."""
    row = results[task]
    get = lambda key, f="none": (None if (v := row.get(f"{key},{f}")) in (None, "N/A") else float(v))  # noqa: E731
    if task in GENERATIVE:
        metric = GENERATIVE[task]
        return {"acc": get(metric, "strict-match"), "acc_stderr": get(f"{metric}_stderr", "strict-match"),
                "acc_norm": None, "acc_norm_stderr": None, "flexible": get(metric, "flexible-extract"),
                "flexible_stderr": get(f"{metric}_stderr", "flexible-extract"), "samples": samples.get(task)}
    out = {key: get(key) for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    if task == "lambada_openai":
        out["perplexity"] = get("perplexity")
    out["samples"] = samples.get(task)
    return out


def mean_scores(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks: acc, and acc_norm taking acc where a task has no acc_norm."""
    accs = [r["acc"] for r in rows.values() if r["acc"] is not None]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in rows.values()]
    norms = [v for v in norms if v is not None]
    return {"acc": sum(accs) / len(accs) if accs else None, "acc_norm": sum(norms) / len(norms) if norms else None}


def run_tasks(lm: Any, tasks: list[str], root: Path, limit: int | None,
              loglikelihoods: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate ``lm`` (an lm-eval LM) on ``tasks``; per task scores plus ``mean``.

    ``loglikelihoods``: also give each task's ``loglikelihoods``, per item the log-likelihood of
    every choice (in lm-eval's document order), for checking the scores against another scorer.
    """
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)  # no index of lm-eval's ~10k configs: we pass full configs
    loaded = manager.load(task_specs(tasks, root))
    output = lm_evaluate(lm, loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=loglikelihoods,
                         verbosity="ERROR")
    samples = {name: int(n["effective"]) for name, n in output.get("n-samples", {}).items()}
    rows = {task: _mmlu_scores(output["results"], samples) if task == "mmlu" else _scores(output["results"], task, samples)
            for task in tasks}
    if loglikelihoods:
        for task in tasks:
            items = sorted(output["samples"].get(task, []), key=lambda item: item["doc_id"])
            rows[task]["loglikelihoods"] = [[float(resp[0]) for resp in item["filtered_resps"]] for item in items]
    return {**rows, "mean": mean_scores(rows)}


def evaluate_tasks(
    model: str | os.PathLike | Any,
    tasks: str | list[str],
    *,
    limit: int | None = None,
    sparsity: float | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 1,
    data: str | os.PathLike | None = None,
    loglikelihoods: bool = False,
    dense: bool = True,
    protocol: str = DEPLOYED,
) -> dict[str, Any]:
    """Zero-shot accuracy of a WINA checkpoint (path, Hub id, or loaded model), dense and sparse.

    Returns ``{"tasks", "limit", "target_sparsity", "dense": {task: scores, "mean": ...},
    "sparse": {...}, "sparsity", "by_role", "seconds"}``; scores are ``acc``, ``acc_stderr``,
    ``acc_norm``, ``acc_norm_stderr`` (None where the task has no acc_norm) and ``samples``
    (plus per-item choice ``loglikelihoods`` with ``loglikelihoods=True``). ``data``: the task
    tree (default ``$WINA_CACHE/eval-data``). ``dense=False`` skips the dense pass (``"dense"`` is None).
    ``protocol``: ``deployed`` or ``all-tokens`` (the module's docstring); the result names it.
    """
    names = parse_tasks(tasks)
    check_protocol(protocol)
    if limit is not None and limit < 1:
        raise WinaError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise WinaError(f"--batch-size must be at least 1, got {batch_size}")
    _lm_eval()
    root = data_root() if data is None else Path(data)
    if not (root / "manifest.json").is_file():
        raise missing_data_error(root)
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from ..progress import quiet_transformers
    from ..runtime.load import load

    net = load(model, sparsity=0, device=device, dtype=dtype) if isinstance(model, (str, os.PathLike)) else model
    control = net.wina
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(net.name_or_path)
    target = control.target_sparsity if sparsity is None else sparsity
    start = time.perf_counter()
    previous, loggers = control.sparsity, _quiet_lm_eval()
    previous_prefill = {name: gate.gate_prefill for name, gate in control.gates.items()}
    lm_class = deployed_lm_class() if protocol == DEPLOYED else HFLM
    try:
        with quiet_transformers():
            lm = lm_class(pretrained=net, tokenizer=tokenizer, batch_size=batch_size, device=str(net.device))
        control.set_gate_prefill(protocol == ALL_TOKENS)  # deployed: a generation's prompt dense
        control.set_sparsity(0.0)
        dense_scores = run_tasks(lm, names, root, limit, loglikelihoods) if dense else None
        control.set_sparsity(target)
        control.reset_stats()
        sparse = run_tasks(lm, names, root, limit, loglikelihoods)
        stats = control.stats()
    finally:
        control.set_sparsity(previous)
        for name, gate in control.gates.items():
            gate.gate_prefill = previous_prefill[name]
        for logger, level in loggers:
            logger.setLevel(level)
    return {"tasks": names, "limit": limit, "protocol": protocol, "target_sparsity": target, "dense": dense_scores, "sparse": sparse,
            "sparsity": stats["sparsity"], "by_role": stats["by_role"], "seconds": time.perf_counter() - start,
            "data": str(root)}


def _quiet_lm_eval() -> list[tuple[logging.Logger, int]]:
    """lm-eval and datasets log every task build at INFO/WARNING; keep errors only, restore after."""
    import datasets

    datasets.disable_progress_bars()
    saved = []
    for name in ("lm-eval", "lm_eval", "datasets"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    return saved
