"""Defaults of ``convert`` and ``wina convert``, chosen from measurements (benchmarks/accuracy_table.py now).

docs/results.md has the measurements they come from. Kept free of heavy
imports: the CLI reads them to build ``--help``.
"""

# From the H200 accuracy tables (docs/results.md, "Accuracy at equal decode bytes";
# benchmarks/results/accuracy_h200/): at equal bytes the layer search (allocation "output") lowers
# held-out perplexity against per-layer greedy on both real models at 0.5 and 0.65 (Qwen2.5-0.5B, WINA:
# 26.6 -> 23.3 at 0.5; against TEAL's greedy 81.9 -> 47.8 at 0.65; SmolLM2 against TEAL's greedy: 34.5 -> 34.0, 149.8 -> 103.1) and keeps off-target
# sparsities on target; WINA and TEAL gates tie under it (within 1.4% geometric mean, WINA ahead on
# Qwen), so the gate stays WINA's. The transform loses at equal bytes (257 vs 34 at 0.5 on SmolLM2),
# centering lost in a prototype, per-head bases are within 1%: all off.
# Low-rank compensation of the dropped channels (--lowrank) is off: see docs/results.md for its measurement.
# The output head is gated inside --sparsity's bytes (--head-sparsity auto: the head skips a searched share of the
# target's bytes, the layers the rest) since 2026-12-03. At equal bytes it beats a dense head on both real models
# (H200, benchmarks/results/accuracy_h200/head_budget/): Qwen2.5-0.5B 19.20 / 19.73 / 23.49 against 20.13 / 23.32 /
# 56.29 at 0.4 / 0.5 / 0.65, zero-shot 43.4 / 44.3 / 43.7 against 43.9 / 43.3 / 37.8 (dense 44.1); SmolLM2 24.83 /
# 28.30 / 53.37 against 26.35 / 33.35 / 119.28, zero-shot 40.6 / 40.6 / 35.8 against 38.6 / 38.1 / 37.2 (dense 41.3).
# Without calibration (--no-calibrate) auto is a dense head. A fixed fraction gates the head on top of --sparsity.
DEFAULTS = {"method": "wina", "transform": False, "allocation": "output", "center": "none", "head_bases": "none", "basis": "svd",
            "lowrank": "0", "head_sparsity": "auto"}

# Calibration tokens the layer search (allocation "output") measures its divergences on. 512 (one
# 512-token window) since 2026-12-02, for conversion time: on SmolLM2 at 0.5 it gave 32.94 at 0.488
# achieved against 32.89 at 0.490 with 1024 (held-out perplexity, same machine) at half the search's
# forwards. The H200 tables of docs/results.md were measured with 1024 (``--search-tokens 1024``).
SEARCH_TOKENS = 512

# Highest sparsity a checkpoint is calibrated for (the allocation levels end there): every --sparsity is in [0, MAX_SPARSITY].
MAX_SPARSITY = 0.9
