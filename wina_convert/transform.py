"""Column orthogonalization (METHOD.md section 2), one decoder layer at a time.

Conventions: weights are ``nn.Linear`` weights ``W`` of shape ``[out, in]`` and activations are
row vectors, so a linear computes ``y = x W^T``. A basis ``Q`` is a ``d x d`` orthogonal matrix and
the residual stream ``h`` is stored rotated as ``h Q``. Then

* a linear reading the (normalized) residual becomes ``W Q``      (``x Q Q^T W^T = x W^T``),
* a linear writing into it becomes ``Q^T W`` and its bias ``Q^T b``,
* the skip connection that crosses from basis ``A`` to basis ``B`` multiplies by ``A^T B``,
  stored as the ``nn.Linear`` weight ``B^T A`` of a *shortcut* module.

RMSNorm divides by the root mean square, which rotations preserve, so a norm without a weight
commutes with ``Q``; every norm weight is therefore folded into the columns of its consumers
first. The attention input is rotated by the right-singular vectors ``V`` of (folded) k_proj, the
MLP input by those of gate_proj; ``W V = U S`` then has orthogonal columns, the case in which
WINA's error bound is tight. lm_head is never gated, so its input keeps the original basis: the
last shortcut rotates back (``Q_last = I``), the final norm and lm_head stay as they are, and a
tied embedding is untied because ``embed_tokens`` becomes ``E Q_attn(0)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .arch import Adapter, Slice

Tensors = dict[str, torch.Tensor]

ATTN_SHORTCUT = "attn_shortcut.weight"
MLP_SHORTCUT = "mlp_shortcut.weight"


def input_basis(weight: torch.Tensor) -> torch.Tensor:
    """``Q`` (``in x in``, orthogonal) such that ``weight @ Q`` has orthogonal columns.

    ``Q`` is ``V`` of ``weight = U S V^T``, computed as the eigenvectors of ``W^T W`` (an
    ``in x in`` problem however many rows ``W`` has; a full SVD would also build ``U``, which is
    never used). Columns are ordered by decreasing singular value; for a wide-but-short matrix
    (a grouped-query k_proj) the trailing columns span its null space, an arbitrary but
    orthonormal completion.
    """
    w = weight.to(torch.float64)
    _, vectors = torch.linalg.eigh(w.T @ w)
    return vectors.flip(-1)


def _rows(weight: torch.Tensor, rows: Slice | None) -> torch.Tensor:
    return weight if rows is None else weight[rows.start : rows.stop]


def fold_norms(layer: Tensors, adapter: Adapter) -> None:
    """Move each RMSNorm weight ``g`` into the columns of the linears reading its output (in place).

    ``W diag(g)`` replaces ``W``, and ``g`` becomes ones; exact because ``norm(h) * g`` feeds
    only those linears.
    """
    for norm, consumers in ((adapter.attn_norm, adapter.attn_inputs), (adapter.mlp_norm, adapter.mlp_inputs)):
        gain = layer[f"{norm}.weight"]
        for name in consumers:
            layer[f"{name}.weight"] = layer[f"{name}.weight"] * gain
        layer[f"{norm}.weight"] = torch.ones_like(gain)


def layer_bases(layer: Tensors, adapter: Adapter, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention and MLP input bases of a layer whose norms are already folded."""
    attn_name, attn_rows = adapter.attn_basis(config)
    mlp_name, mlp_rows = adapter.mlp_basis(config)
    q_attn = input_basis(_rows(layer[f"{attn_name}.weight"], attn_rows))
    q_mlp = input_basis(_rows(layer[f"{mlp_name}.weight"], mlp_rows))
    return q_attn, q_mlp


def _rotate_output(layer: Tensors, name: str, q: torch.Tensor) -> None:
    layer[f"{name}.weight"] = q.T @ layer[f"{name}.weight"]
    if f"{name}.bias" in layer:
        layer[f"{name}.bias"] = q.T @ layer[f"{name}.bias"]


def rotate_layer(
    layer: Tensors,
    adapter: Adapter,
    q_attn: torch.Tensor,
    q_mlp: torch.Tensor,
    q_next: torch.Tensor,
) -> None:
    """Rotate a folded layer into its bases and add its two shortcut rotations (in place).

    ``q_next`` is the basis the residual must be in after this layer: the next layer's attention
    basis, or the identity after the last layer.
    """
    for name in adapter.attn_inputs:
        layer[f"{name}.weight"] = layer[f"{name}.weight"] @ q_attn
    _rotate_output(layer, adapter.attn_output, q_mlp)
    for name in adapter.mlp_inputs:
        layer[f"{name}.weight"] = layer[f"{name}.weight"] @ q_mlp
    _rotate_output(layer, adapter.mlp_output, q_next)
    layer[ATTN_SHORTCUT] = shortcut_rotation(q_attn, q_mlp)
    layer[MLP_SHORTCUT] = shortcut_rotation(q_mlp, q_next)


def shortcut_rotation(q_from: torch.Tensor, q_to: torch.Tensor) -> torch.Tensor:
    """The ``nn.Linear`` weight that moves a residual from basis ``q_from`` to ``q_to``."""
    return q_to.T @ q_from


def rotate_embedding(embedding: torch.Tensor, q_attn0: torch.Tensor) -> torch.Tensor:
    """Token embeddings are residual vectors: ``E Q_attn(0)``."""
    return embedding.to(torch.float64) @ q_attn0


def column_norms(weight: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """``[P, in]``: ``||W[:, i]||`` of each of the ``P`` matrices stacked in ``weight``; WINA's ``c``."""
    return torch.stack([w.float().norm(dim=0) for w in weight.split(splits, dim=0)])
