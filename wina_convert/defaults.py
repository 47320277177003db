"""Defaults of ``convert`` and ``wina convert``, chosen from measurements (benchmarks/accuracy_table.py now).

README.md ("What we measured and the defaults") has the table they come from. Kept free of heavy
imports: the CLI reads them to build ``--help``.
"""

# SmolLM2-135M (benchmarks/results/calibration.md): greedy beats uniform for both methods; without the
# transform WINA is as good as or better than with it up to 0.5 (34.6 vs 37.1 at 0.5) and decodes
# faster (no shortcut rotations to read); the transform pays off only at 0.65 (133.5 vs 147.3) when
# sparsity counted parameters, and not at all now that it counts bytes (at 0.5 bytes its matrices must
# skip 0.6875). Centering lost in a prototype (README); per-head bases and the global allocation are
# options until the GPU table (README, "Accuracy at equal decode bytes") decides: defaults unchanged.
DEFAULTS = {"method": "wina", "transform": False, "allocation": "greedy", "center": "none", "head_bases": "none"}

# Highest sparsity a checkpoint is calibrated for (the allocation levels end there): every --sparsity is in [0, MAX_SPARSITY].
MAX_SPARSITY = 0.9
