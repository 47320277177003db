"""The gate rule, written once: scores, their quantiles, and the per-channel thresholds they give.

A gated linear ``y = x W^T`` keeps input channel ``i`` of a token when its score is above a threshold
``t``: the score is ``|x_i| c_i`` for WINA, with ``c_i = ||W[:, i]||`` the norm of the weight column
that ``x_i`` multiplies (``column_norms``), and ``|x_i|`` for TEAL. To skip a fraction ``s`` of the
inputs, ``t`` is the ``s``-quantile of the scores over calibration tokens. Calibration stores the
quantiles at ``QUANTILE_LEVELS`` (``score_quantiles``); any ``s`` is then interpolated from them
(``interp``), and the runtime compares ``|x_i|`` with a per-channel threshold ``t / c_i`` (WINA) or
``t`` (TEAL) (``thresholds_at``), so that no score is computed at run time. The same rule serves
calibration (gating at the target while it propagates), the runtime (``model.wina.set_sparsity``)
and ``wina inspect``.

A layer's sparsity is shared among its matrices by an allocation recorded at ``ALLOCATION_LEVELS``
(layer levels from 0 to ``MAX_SPARSITY``).
"""

from __future__ import annotations

import torch

from .defaults import MAX_SPARSITY
from .errors import WinaError

QUANTILE_LEVELS = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
ALLOCATION_LEVELS = torch.linspace(0.0, MAX_SPARSITY, 37, dtype=torch.float64)
MAX_SCORES = 1 << 18  # scores kept per gate for the quantiles (a uniform subsample)


def interp(x: float | torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``ys`` (``[..., len(xs)]``) at ``x``, clamped to the ends."""
    x = torch.as_tensor(x, dtype=torch.float64).clamp(float(xs[0]), float(xs[-1]))
    hi = int(torch.searchsorted(xs, x.reshape(1), right=False).clamp(1, len(xs) - 1))
    lo = hi - 1
    w = ((x - xs[lo]) / (xs[hi] - xs[lo])).to(ys.dtype) if xs[hi] > xs[lo] else torch.zeros((), dtype=ys.dtype)
    return ys[..., lo] + w * (ys[..., hi] - ys[..., lo])


def column_norms(weight: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """``[P, in]``: ``||W[:, i]||`` of each of the ``P`` matrices stacked in ``weight``; WINA's ``c``."""
    return torch.stack([w.float().norm(dim=0) for w in weight.split(splits, dim=0)])


def score_quantiles(x: torch.Tensor, norms: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Quantiles (at ``QUANTILE_LEVELS``) of ``|x_i| * norms_i`` over tokens and channels.

    At most ``MAX_SCORES`` entries, drawn uniformly, are scored: gathering them before scoring
    keeps the working memory small however large ``tokens x channels`` is (117M entries for 8k
    tokens of a Llama-3-8B down_proj).
    """
    flat = x.reshape(-1)
    width = x.shape[-1]
    index = None
    if flat.numel() > MAX_SCORES:
        index = torch.randint(flat.numel(), (MAX_SCORES,), generator=generator).to(flat.device)
        flat = flat[index]
    scores = flat.abs().float()
    if norms is not None:
        norms = norms.to(scores.device, torch.float32)
        scores = scores * (norms[index % width] if index is not None else norms.repeat(flat.numel() // width))
    ordered = scores.sort().values
    position = (QUANTILE_LEVELS * (ordered.numel() - 1)).round().long().to(ordered.device)
    return ordered[position].cpu()


def thresholds_at(quantiles: torch.Tensor | None, norms: torch.Tensor, sparsity: float, method: str,
                  levels: torch.Tensor = QUANTILE_LEVELS) -> torch.Tensor:
    """Per-channel thresholds of one matrix at ``sparsity``: ``t / c_i`` (WINA) or ``t`` (TEAL).

    ``t`` is the ``sparsity``-quantile of the matrix's scores, interpolated from ``quantiles``
    (recorded at ``levels``); a channel whose column norm is 0 never contributes and is always
    dropped (infinite threshold). Sparsity 0 gives zeros: dense (``quantiles`` may then be None).
    """
    if sparsity <= 0:
        return torch.zeros_like(norms)
    t = float(interp(sparsity, levels, quantiles.to(torch.float64)))
    if method == "teal":
        return torch.full_like(norms, t)
    return torch.where(norms > 0, t / norms.clamp_min(1e-30), torch.full_like(norms, float("inf")))


def fraction(value: object, option: str = "--sparsity") -> float:
    """``value`` (a number or its text) as a sparsity in ``[0, MAX_SPARSITY]``; else a one-line error naming
    ``option``. The one range check of every sparsity option (the CLI's, ``convert``'s, ``model.wina``'s)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WinaError(f"{option} must be a number in [0, {MAX_SPARSITY}], got {value!r}") from None
    if not 0.0 <= number <= MAX_SPARSITY:
        raise WinaError(f"{option} must be a number in [0, {MAX_SPARSITY}], got {value}")
    return number
