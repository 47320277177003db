"""Running WINA checkpoints sparse: ``load.py`` (checkpoint -> transformers model), ``control.py``
(``model.wina``: thresholds at any sparsity, counters), ``modules.py`` (the swapped-in layers),
``graphs.py`` (CUDA-graph decode), ``kernels/`` (triton kernels and where they plug in)."""
