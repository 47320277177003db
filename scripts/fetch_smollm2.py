"""Compatibility shim: ``python scripts/fetch_smollm2.py [--hf DIR]`` is ``scripts/fetch_models.py smollm2``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_models import DEFAULT_CACHE, build_hf_dir, fetch_gguf, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.argv[1:1] = ["smollm2"]
    main()
