"""Measuring checkpoints: ``perplexity.py`` (``wina eval``), ``bench.py`` (``wina bench``), ``inspect.py``
(``wina inspect``)."""
