"""Allocation: how a decoder layer's sparsity is shared among its gated matrices, at every layer level.

For each layer the calibrator records an allocation ``[len(ALLOCATION_LEVELS), matrices]``: the
sparsity of each matrix when the layer as a whole (the size-weighted mean) is at each level of
``gate.ALLOCATION_LEVELS``; the runtime interpolates it at the sparsity asked for. ``uniform``: every
matrix at the layer's level. ``greedy``: from each matrix's error curve (the layer-output error with
that matrix alone gated at the ``GREEDY_GRID`` sparsities), the matrix with the least error per
skipped parameter is sparsified next. Inputs that are exactly zero are skipped for free and credited
in both (``zero_fraction``).
"""

from __future__ import annotations

import torch

from ..gate import ALLOCATION_LEVELS, QUANTILE_LEVELS, interp

GREEDY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)


def zero_fraction(quantiles: torch.Tensor) -> float:
    """The fraction of scores that are exactly zero: inputs that are skipped for free."""
    zero = (quantiles <= 0).nonzero()
    return float(QUANTILE_LEVELS[int(zero[-1])]) if len(zero) else 0.0


def uniform_path(count: int, free: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Every matrix at the layer's level; matrices with free (all-zero) inputs are credited."""
    levels = ALLOCATION_LEVELS
    rows = []
    for level in levels.tolist():
        # Find the common sparsity u such that the size-weighted mean of max(u, free) is the level.
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            value = float((torch.clamp(free, min=mid) * sizes).sum() / sizes.sum())
            lo, hi = (mid, hi) if value < level else (lo, mid)
        rows.append(torch.clamp(free, min=hi) if level > 0 else torch.zeros(count, dtype=torch.float64))
    return torch.stack(rows)


def greedy_path(curves: list[list[tuple[float, float]]], sizes: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Allocation ``[len(ALLOCATION_LEVELS), matrices]`` from per-matrix error curves.

    Starting from each matrix's free sparsity, repeatedly advance the matrix whose next grid step
    costs the least error per skipped parameter; the layer level (size-weighted mean) rises
    monotonically, and the allocation at each level is interpolated along the path.
    """
    state = free.clone()
    position = [0] * len(curves)
    total = float(sizes.sum())
    path_levels = [float((state * sizes).sum()) / total]
    path_states = [state.clone()]
    while True:
        best, best_cost = None, float("inf")
        for m, curve in enumerate(curves):
            if position[m] + 1 >= len(curve):
                continue
            (s0, e0), (s1, e1) = curve[position[m]], curve[position[m] + 1]
            cost = (e1 - e0) / (float(sizes[m]) * (s1 - s0))
            if cost < best_cost:
                best, best_cost = m, cost
        if best is None:
            break
        position[best] += 1
        state[best] = curves[best][position[best]][0]
        path_levels.append(float((state * sizes).sum()) / total)
        path_states.append(state.clone())
    xs = torch.tensor(path_levels, dtype=torch.float64)
    ys = torch.stack(path_states).T  # [matrices, steps]
    rows = []
    for level in ALLOCATION_LEVELS.tolist():
        if level <= 0:
            rows.append(torch.zeros(len(curves), dtype=torch.float64))
        elif level <= xs[0]:
            rows.append(ys[:, 0].clone())
        else:
            rows.append(interp(level, xs, ys))
    return torch.stack(rows)
