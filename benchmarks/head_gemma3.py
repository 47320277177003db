"""Gemma-3-270M with the head inside the budget (the default), converted as the test suite's fixture does
(tests/test_gemma3.py: 4 x 512 calibration tokens, per-layer greedy, no transform) at 0.5, then evaluated on the
bundled held-out text (4096 tokens). Prints the head's search report, the planned levels and the held-out result.

    python benchmarks/head_gemma3.py [OUT]      # OUT default /tmp/gemma3-head; needs scripts/fetch_models.py gemma3-270m --hf
"""
import json
import os
import sys
from pathlib import Path

from wina_convert import convert, evaluate, load

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gemma3-head")
source = Path(os.environ.get("WINA_CACHE", Path.home() / ".cache/wina-convert")) / "gemma3-270m-hf"
if not out.exists():
    convert(source, out, sparsity=0.5, transform=False, samples=4, allocation="greedy", quiet=True)
wina = json.loads((out / "config.json").read_text())["wina"]
print({k: wina.get(k) for k in ("head_sparsity", "head_share")}, wina["calibration"]["head"])
model = load(out)
ctl = model.wina
print("head bytes", ctl.head_bytes, "gated bytes", sum(ctl.gated_bytes), "layers' level", ctl.matrix_level(0, 0.5),
      "head level", ctl.head_level(0.5))
result = evaluate(model, max_tokens=4096)
print({k: result[k] for k in ("perplexity", "dense_perplexity", "sparsity", "kept_bytes_fraction", "head_sparsity")})
