"""Defaults of ``convert`` and ``wina convert``, chosen from benchmarks/calibration_table.py's measurements.

README.md ("What we measured and the defaults") has the table they come from. Kept free of heavy
imports: the CLI reads them to build ``--help``.
"""

DEFAULTS = {"method": "wina", "transform": True, "allocation": "greedy"}
