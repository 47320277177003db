"""A non-editable install works (issue 18, item 2): the wheel ships the bundled calibration and held-out
text, so the default ``wina convert`` and ``wina eval`` run where the source tree cannot be seen.

The wheel is built from a copy of the package (so the worktree gets no build/ or egg-info), installed
with ``pip install --no-deps --target DIR`` on top of the test environment's dependencies, and run from
another directory with ``PYTHONPATH=DIR`` only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # ~40 s on the 2-core machine: building, installing, two subprocesses


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result


def test_wheel_install_converts_and_evaluates(tiny_models, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "wina_convert", source / "wina_convert", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(tmp_path / "dist")], source, env)
    wheels = list((tmp_path / "dist").glob("wina_convert-*.whl"))
    assert len(wheels) == 1
    target = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheels[0])], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(target)
    where = _run([sys.executable, "-c", "import wina_convert, sys; print(wina_convert.__file__)"], elsewhere, env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(target.resolve()), where.stdout
    data = target / "wina_convert" / "calibration" / "data"
    assert list((data / "train").glob("*.txt")) and (data / "heldout" / "heldout.txt").is_file()

    out = elsewhere / "out"
    _run([sys.executable, "-m", "wina_convert", "convert", str(tiny_models["llama"]), "-o", str(out),
          "--samples", "2", "--seq-len", "32", "-q"], elsewhere, env)
    calibration = json.loads((out / "config.json").read_text())["wina"]["calibration"]
    assert calibration["dataset"].startswith("bundled")
    result = _run([sys.executable, "-m", "wina_convert", "eval", str(out), "--json", "--max-tokens", "256",
                   "--seq-len", "64"], elsewhere, env)
    report = json.loads(result.stdout)
    assert report["tokens"] > 0 and report["perplexity"] > 1 and "heldout" in str(report["text"])
