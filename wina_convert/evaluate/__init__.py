"""Measuring checkpoints: ``perplexity.py`` (``wina eval``), ``tasks.py`` (``wina eval --tasks``: zero-shot
accuracy through lm-eval, data from ``taskdata.py``, printed by ``report.py``), ``bench.py`` (``wina bench``),
``inspect.py`` (``wina inspect``)."""
