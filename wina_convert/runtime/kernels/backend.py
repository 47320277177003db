"""Triton, when it is installed: ``HAS_TRITON``, the ``triton`` / ``tl`` modules (None without it).

CPU installs have no triton: every kernel module still imports, the triton code is not defined and
the callers take their torch fallbacks.
"""

from __future__ import annotations

import torch

try:  # triton is optional: CPU installs import the kernel modules only for the references
    import triton
    import triton.language as tl

    try:
        from triton import knobs
    except Exception:  # pragma: no cover - triton without knobs: no fast launches
        knobs = None
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    knobs = None
    HAS_TRITON = False


def triton_available(device) -> bool:
    """True when ``device`` is a CUDA device and triton can be imported."""
    if not HAS_TRITON:
        return False
    try:
        dev = torch.device(device)
    except Exception:
        return False
    return dev.type == "cuda" and torch.cuda.is_available()
