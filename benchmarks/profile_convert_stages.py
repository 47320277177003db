"""Time the stages of one default SmolLM2 conversion (this CPU): the layer search, the head's two calibrations,
its share search and the level-scale refit, each checkpoint load; the total at the end.

    python benchmarks/profile_convert_stages.py [OUT]    # OUT default /tmp/prof-out (replaced)
"""
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

convert_module = importlib.import_module("wina_convert.convert")  # the package's ``convert`` is the function
load_module = importlib.import_module("wina_convert.runtime.load")


def timed(module, name):
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        return result

    setattr(module, name, wrapper)


for stage in ("_calibrate_head", "_search_head_share", "_fit_head_scale", "_search_allocation"):
    timed(convert_module, stage)
timed(load_module, "load")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/prof-out")
shutil.rmtree(out, ignore_errors=True)
gguf = Path(os.environ.get("WINA_CACHE", Path.home() / ".cache/wina-convert")) / "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
result = convert_module.convert(str(gguf), out, sparsity=0.5, quiet=True)
print(f"total: {result.seconds:.1f} s; stages: {result.stage_seconds}")
