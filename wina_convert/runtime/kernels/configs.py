"""Launch shapes of the gated-linear kernels: the ``Config`` type, the per-shape table tuned on the H200,
the defaults for other shapes, and the batch size up to which the sparse batched kernel is used."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Largest number of rows that still goes through the sparse batched kernel. Measured on an H100 (CUDA
# graphs, B = 2..64): the union mask keeps 73% of rows at B=2, s=0.5 and the tl.dot kernel lost to masked
# cuBLAS on o/gate_up/down at every B, so every B > 1 goes to cuBLAS (set >1, or $WINA_BATCH_SPARSE_MAX, to
# route small B to the kernel).
BATCH_SPARSE_MAX = int(os.environ.get("WINA_BATCH_SPARSE_MAX") or 1)


@dataclass(frozen=True)
class Config:
    """One launch shape: tile sizes, warps, pipelining depth, and programs per multiprocessor."""

    block_n: int = 256
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2
    waves: float = 4.0
    block_m: int = 16  # batched kernel only
    prefetch: bool = True  # GEMV only
    pipe: bool = False  # GEMV: issue the next tile's loads before consuming this one
    acc1d: bool = False  # GEMV: one-row accumulator (fewer registers, more programs per SM)


# Per (K, N) decode configs tuned on the H200 by benchmarks/sweep_gemv.py (CUDA-graph timings at sparsity
# 0 / 0.4 / 0.5 / 0.65, benchmarks/results/h200/sweep_gemv.txt): the one-row accumulator and 4 waves won
# on every Llama-3-8B shape (at 0.5: qkv 12.6 -> 10.7 us, o 9.3 -> 8.7, gate_up 45.1 -> 36.8, down 22.7 ->
# 20.2 against the H100-tuned configs, which had a [BLOCK_K, BLOCK_N] accumulator and 2 waves); other
# shapes use default_gemv.
DEFAULT_GEMV = Config(block_n=1024, block_k=16, num_warps=4, num_stages=1, waves=4, prefetch=False, acc1d=True)
TUNED_GEMV: dict[tuple[int, int], Config] = {
    (4096, 6144): DEFAULT_GEMV,  # Llama-3-8B q/k/v fused
    (4096, 4096): DEFAULT_GEMV,  # o
    (4096, 28672): Config(block_n=2048, block_k=16, num_warps=4, num_stages=1, waves=4, prefetch=False, acc1d=True),  # gate/up fused
    (14336, 4096): DEFAULT_GEMV,  # down
}
SMALL_GEMV = Config(block_n=256, block_k=32, num_warps=4, num_stages=1, waves=4, prefetch=True)


def default_gemv(K: int, N: int) -> Config:
    """The decode config of a shape that is not in ``TUNED_GEMV``."""
    return DEFAULT_GEMV if N >= 2048 else SMALL_GEMV


# The batched sparse kernel (rows 2..BATCH_SPARSE_MAX).
DEFAULT_GEMM = Config(block_n=64, block_k=64, num_warps=4, num_stages=3, waves=4.0, block_m=16)
