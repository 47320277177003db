"""Check for benchmarks/results/serve_cpu.md: is `wina generate`'s loop slower on the main thread than on a worker thread
(the server's)? One process, one model, 24 tokens at temperature 0, main and worker alternated.

    python benchmarks/serve_thread_check.py   # output: benchmarks/results/serve_thread_check.txt
"""
import time, torch
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from transformers import AutoTokenizer
from wina_convert import load
from wina_convert.generate import generate, prompt_ids
ck = Path.home() / ".cache/wina-convert/smollm2-wina-serve-bench"
m = load(ck); tok = AutoTokenizer.from_pretrained(ck)
ids = prompt_ids(tok, "Write a short story about a lighthouse keeper.", chat=True)
ex = ThreadPoolExecutor(1)
def run():
    t = time.perf_counter(); g = generate(m, tok, ids, 24); return 24 / (time.perf_counter() - t)
run()
for i in range(2):
    print("main", round(run(), 2), "worker", round(ex.submit(run).result(), 2), flush=True)
