"""Sizes and fractions as people read and write them (``5GB``, ``50.0%``): the CLI, the model card, convert."""

from __future__ import annotations

import re
from typing import Any

from .errors import WinaError


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", size, re.IGNORECASE)
    if not match:
        raise WinaError(f"cannot read size {size!r}: write e.g. 5GB or 500MB")
    unit = (match.group(2) or "B").upper().replace("B", "")
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "")]
    value = int(float(match.group(1)) * base**power)
    if value <= 0:
        raise WinaError(f"shard size must be positive, got {size!r}")
    return value


def human_size(size: int) -> str:
    """Bytes in decimal units: ``812 B``, ``5.4 MB``, ``16.1 GB``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def percent(value: Any, *, space: bool = False, missing: str | None = None) -> str:
    """A fraction as a percentage with one decimal (``0.5`` -> ``50.0%``, or ``50.0 %`` with ``space``).

    Anything that is not a number is shown as it is, ``None`` as ``missing`` when that is given.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100 * value:.1f}{' ' if space else ''}%"
    if value is None and missing is not None:
        return missing
    return str(value)
