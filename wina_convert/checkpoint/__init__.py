"""WINA checkpoints on disk: ``format.py`` (file names, config block, sidecar, manifest, verify),
``source.py`` (reading the model to convert: safetensors, GGUF, the Hub), ``writer.py`` (shards, the
output directory)."""
