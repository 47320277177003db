"""GPU kernels for the sparse runtime: ``backend.py`` (is triton there), ``gemv.py`` (the gated-linear
triton kernels), ``configs.py`` (launch shapes tuned per matrix shape), ``launch.py`` (dispatch: kernel,
cuBLAS or torch fallback; the torch.compile operator), ``attention.py`` (decode attention), ``hook.py``
(binding the kernels to a loaded model's gated linears)."""
