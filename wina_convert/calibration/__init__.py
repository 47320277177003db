"""Calibration (docs/method.md section 3): ``text.py`` (calibration and evaluation text, token windows),
``selfgen.py`` (text the model writes itself), ``allocation.py`` (per-matrix sparsity allocation),
``calibrator.py`` (the layer-by-layer calibrator); ``data/`` holds the bundled text."""
