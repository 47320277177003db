"""Low-rank compensation of the dropped channels (``convert --lowrank``, R-Sparse's idea).

A gated linear computes ``y = W (m * x) + b`` with ``m`` the keep mask of the token. The channels it
drops are not lost: ``W ((1 - m) * x)`` is what they would have added. A rank-``r`` map ``A B``
(``A`` ``[out, r]``, ``B`` ``[r, in]``) adds an estimate of it back::

    y ~= W (m * x) + A (B ((1 - m) * x)) + b

At sparsity 0 nothing is dropped, so the term is exactly 0 (and it is not computed: the gate is off).
The factors are read at every decode step, ``r (in + out)`` numbers per matrix in the weight dtype,
so they count as bytes read (``lowrank_fraction``): the matrices skip more columns to pay for them.

Choosing ``A, B`` (activation-aware). With ``z = (1 - m) * x`` the dropped part of a calibration
token, the error over the calibration tokens is ``sum ||(W - A B) z||^2 = ||(W - A B) S||_F^2`` for any
square root ``S`` of the dropped part's second moment ``C = sum z z^T = S S^T``. Its minimum over rank
``r`` maps is ``A B = [W S]_r S^{-1}`` (Eckart-Young on ``W S``): with ``W S = U s V^T``, ``A = U_r s_r``
and ``B = V_r^T S^{-1}``. ``S`` is the Cholesky factor of ``C`` after a small ridge (channels never dropped have
no variance there; the ridge also pulls the fit towards the plain SVD of ``W`` where the data say little). Unlike the plain top-r SVD
of ``W`` (R-Sparse), this spends the rank on the directions the *dropped* inputs actually take, which
matter more than the weight's own large directions (those channels are mostly kept).

The mask, hence ``C``, depends on the thresholds: the factors are fitted at the calibrated target's
thresholds, on the sparse model's actual inputs (``Calibrator``); other sparsities reuse them.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import WinaError
from .transform import shortcut_fraction

RIDGE = 1e-4  # ridge on the dropped part's second moment, relative to its mean diagonal
EXACT_SIDE = 2048  # matrices up to this smaller side get the exact top-r fit; larger ones a randomized one
POWER_ITERATIONS = 6  # of the randomized fit (each one two products with the matrix)


def parse_ranks(spec: str | int | None, linears: tuple[str, ...]) -> dict[str, int]:
    """The rank of each gated linear (names relative to a layer) from ``--lowrank``.

    ``spec`` is one rank for every gated matrix (``"32"``; ``0`` or None: off) or ``ROLE=RANK`` pairs,
    comma-separated (``"down=32,qkv=16"``): a role is a linear's last name with or without ``_proj``
    (``down``, ``o_proj``), ``qkv`` for q, k and v (and a fused qkv_proj), ``gate_up`` for gate and up
    (and a fused gate_up_proj); unnamed roles get rank 0. Every linear is a key (rank 0 where off).
    """
    ranks = {name: 0 for name in linears}
    if spec is None:
        return ranks
    text = str(spec).strip()
    if "=" not in text:
        return {name: _rank(text) for name in linears}
    roles = {name: name.rsplit(".", 1)[-1] for name in linears}
    for item in text.split(","):
        role, _, value = item.partition("=")
        role = role.strip().removesuffix("_proj")
        rank = _rank(value)
        matched = [name for name, own in roles.items() if role in _aliases(own.removesuffix("_proj"))]
        if not role or not matched:
            known = sorted({own.removesuffix("_proj") for own in roles.values()} | {"qkv", "gate_up"})
            raise WinaError(f"--lowrank: unknown role {role!r} in {text!r}: use one of {', '.join(known)}")
        for name in matched:
            ranks[name] = rank
    return ranks


def _aliases(role: str) -> set[str]:
    """The role names that select a linear of role ``role`` (its own, and its group's)."""
    if role in ("q", "k", "v", "qkv"):
        return {role, "qkv"}
    if role in ("gate", "up", "gate_up"):
        return {role, "gate_up"}
    return {role}


def _rank(value: str) -> int:
    try:
        rank = int(value.strip())
    except ValueError:
        raise WinaError(f"--lowrank takes a rank (e.g. 32) or ROLE=RANK pairs (e.g. down=32,qkv=16), got {value!r}") from None
    if rank < 0:
        raise WinaError(f"--lowrank: a rank must be >= 0, got {rank}")
    return rank


def factor_params(rank: int, out_features: int, in_features: int, matrices: int) -> int:
    """Numbers in the factors of one gated linear: ``rank (in + out_p)`` per stacked matrix."""
    return rank * (matrices * in_features + out_features)


def lowrank_fraction(ranks: dict[str, int], shapes: dict[str, tuple[int, int, int]]) -> float:
    """A layer's factor numbers over its gated matrices' (bytes read beside the kept columns).

    ``shapes[name] = (out, in, matrices)`` of each gated linear of the layer.
    """
    gated = sum(out * inp for out, inp, _ in shapes.values())
    return sum(factor_params(ranks.get(name, 0), *shapes[name]) for name in shapes) / gated


def extra_fraction(config: Any, shapes: dict[str, tuple[int, int, int]], shortcuts: bool, ranks: dict[str, int]) -> float:
    """The bytes a layer reads beside its gated matrices' kept columns, over the matrices': its two ``d x d``
    shortcut rotations (``shortcuts``) and its low-rank factors (``shapes`` as in ``lowrank_fraction``)."""
    return (shortcut_fraction(config, [out * inp for out, inp, _ in shapes.values()], shortcuts)
            + lowrank_fraction(ranks, shapes))


def check_ranks(ranks: dict[str, int], shapes: dict[str, tuple[int, int, int]]) -> None:
    """A rank above a matrix's smaller side gains nothing and costs more than the matrix itself."""
    for name, rank in ranks.items():
        out, inp, matrices = shapes[name]
        limit = min(out // matrices, inp)
        if rank > limit:
            raise WinaError(f"--lowrank: rank {rank} for {name} is above its smaller side ({limit}); use a smaller rank")


def dropped_moment(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[P, in, in]`` float64: ``sum z z^T`` of the dropped part ``z = x * [|x| <= thr_p]`` over the tokens of
    ``x`` ``[..., in]``, for each threshold row of ``thresholds`` ``[P, in]`` (the gate's rule: keep ``|x| > thr``)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = thresholds.to(flat.device, flat.dtype)
    moments = torch.zeros(rows.shape[0], flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for chunk in flat.split(4096):
        for p in range(rows.shape[0]):
            z = torch.where(chunk.abs() > rows[p], torch.zeros_like(chunk), chunk).double()
            moments[p].addmm_(z.T, z)
    return moments


def fit_factors(weight: torch.Tensor, moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [out, r], B [r, in])`` float32 minimizing ``||(W - A B) S||_F`` with ``S S^T = moment`` (ridged).

    ``S`` is the Cholesky factor ``L`` (any square root gives the same minimizer; ``L`` costs a fraction of
    an eigendecomposition, and ``B = V_r^T L^{-1}`` is one triangular solve). All zero when nothing was
    dropped (``moment == 0``): the term then adds nothing, as it should.

    The top ``r`` singular triplets of ``M = W L``: for a matrix whose smaller side is at most ``EXACT_SIDE``,
    from the eigendecomposition of its Gram matrix on that side (``M M^T`` or ``M^T M``, float64; the same
    subspace as a full SVD); above it, by a seeded randomized subspace iteration (``_top_triplets``), which
    costs a few products with ``M`` instead of a cubic decomposition (float64 eigendecompositions of
    4096-wide Gram matrices made an 8B-shape conversion take over five minutes on an H200).
    """
    w = weight.detach().to(moment.device, torch.float64)
    out, inp = w.shape
    scale = float(moment.diagonal().mean())
    if rank == 0 or not scale > 0:
        return torch.zeros(out, rank), torch.zeros(rank, inp)
    root = torch.linalg.cholesky(moment + RIDGE * scale * torch.eye(inp, dtype=torch.float64, device=moment.device))
    m = w @ root
    if min(out, inp) > EXACT_SIDE:
        u, s, vt = _top_triplets(m, rank)
        a = u * s
    elif out <= inp:  # M M^T = U s^2 U^T: A = U_r s_r, V_r^T = U_r^T M / s_r
        evals, evecs = torch.linalg.eigh(m @ m.T)
        u = evecs[:, -rank:].flip(-1)
        s = evals[-rank:].flip(-1).clamp_min(0).sqrt()
        a = u * s
        tiny = s[0] * 1e-12  # a direction M does not have (rank above M's): no term there
        vt = (u.T @ m) / torch.where(s > tiny, s, torch.full_like(s, float("inf")))[:, None]
    else:  # M^T M = V s^2 V^T: A = M V_r (= U_r s_r)
        evals, evecs = torch.linalg.eigh(m.T @ m)
        v = evecs[:, -rank:].flip(-1)
        a = m @ v
        vt = v.T
    b = torch.linalg.solve_triangular(root.T, vt.T, upper=True).T  # V_r^T L^{-1}
    return a.float().cpu(), b.float().cpu()


def _top_triplets(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, s_r, V_r^T)`` of ``m`` by randomized subspace iteration (Halko, Martinsson and Tropp): a seeded
    Gaussian sketch of ``2 r + 8`` columns, ``POWER_ITERATIONS`` orthonormalized passes of ``M M^T``, then the
    exact SVD of the small projection ``Q^T M``."""
    k = min(min(m.shape), 2 * rank + 8)
    g = torch.Generator(device="cpu").manual_seed(0)
    y = m @ torch.randn(m.shape[1], k, generator=g, dtype=m.dtype).to(m.device)
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(y).Q
        y = m @ torch.linalg.qr(m.T @ q).Q
    q = torch.linalg.qr(y).Q
    ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def fit_gate(weight: torch.Tensor, splits: list[int], x: torch.Tensor, thresholds: torch.Tensor,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of a gated linear (``splits`` stacked matrices, one threshold row each) fitted on its input
    ``x``: ``A`` ``[out, r]`` (the matrices' rows stacked) and ``B`` ``[P, r, in]``."""
    moments = dropped_moment(x, thresholds)
    a_parts, b_parts, start = [], [], 0
    for p, size in enumerate(splits):
        a, b = fit_factors(weight[start : start + size], moments[p], rank)
        a_parts.append(a)
        b_parts.append(b)
        start += size
    return torch.cat(a_parts), torch.stack(b_parts)


def check_factors(name: str, a: Any, b: Any, out_features: int, in_features: int, matrices: int) -> int:
    """The rank of a sidecar's factors of gated linear ``name``; a one-line error if they do not fit it."""
    if a is None or b is None:
        raise WinaError(f"the sidecar has only one of the low-rank factors of {name}: it is incomplete or edited")
    rank = a.shape[-1] if a.dim() == 2 else -1
    if a.dim() != 2 or tuple(a.shape) != (out_features, rank) or tuple(b.shape) != (matrices, rank, in_features):
        raise WinaError(f"the sidecar's low-rank factors of {name} do not fit its weight (shapes {tuple(a.shape)}, {tuple(b.shape)})")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise WinaError(f"the sidecar's low-rank factors of {name} are not finite")
    return rank
