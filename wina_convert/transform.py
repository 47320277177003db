"""Column orthogonalization (docs/method.md section 2), one decoder layer at a time.

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

``--basis`` chooses the bases (``BASES``): ``svd`` is the above; ``pca`` takes each sub-block's basis
from its calibration inputs instead (the eigenvectors of ``E[x^T x]``, ``x`` the RMSNorm output with
the gain folded away, as LaRoSA does); ``pooled`` uses one such basis for the whole residual stream,
so that every shortcut is the identity and none is stored, read or counted: the last layer writes in
that basis too and the final norm's gain and ``Q`` fold into lm_head's columns instead.
"""

from __future__ import annotations

from typing import Any

import torch

from .arch import Adapter, Slice

Tensors = dict[str, torch.Tensor]

ATTN_SHORTCUT = "attn_shortcut.weight"
MLP_SHORTCUT = "mlp_shortcut.weight"
BASES = ("svd", "pca", "pooled")
BLOCK_ELEMENTS = 1 << 21  # float64 elements of one block of a blocked product: 16 MiB


def input_basis(weight: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """``Q`` (``in x in``, orthogonal, float64) such that ``W diag(gain) Q`` has orthogonal columns.

    ``Q`` is ``V`` of ``W diag(gain) = U S V^T``, columns ordered by decreasing singular value, on
    the device of ``gain`` (else of ``weight``). A full SVD would also build ``U`` (14336 x 14336
    for a Llama-3-8B gate_proj), which is never used, so:

    * ``out >= in`` (gate_proj): ``V`` = eigenvectors of ``W^T W``, an ``in x in`` problem
      whatever the row count, the Gram matrix accumulated block by block in float64.
    * ``out < in`` (a grouped-query k_proj, 1024 x 4096): ``W^T = Q_1 R`` (Householder QR,
      ``mode="complete"``), so ``W = R^T Q_1^T`` and ``V = [Q_1 Z, Q_2]`` with ``Z`` the
      eigenvectors of the small ``R R^T``; ``Q_2`` spans the null space of ``W``, an arbitrary
      but orthonormal completion. No ``in x in`` eigenproblem is solved.
    """
    rows, cols = weight.shape
    device = (gain if gain is not None else weight).device
    if rows >= cols:
        _, vectors = torch.linalg.eigh(_gram(weight, gain, device))
        return vectors.flip(-1)
    w = _folded(weight, gain, device)
    q, r = torch.linalg.qr(w.T, mode="complete")
    r = r[:rows]
    _, z = torch.linalg.eigh(r @ r.T)
    return torch.cat([q[:, :rows] @ z.flip(-1), q[:, rows:]], dim=1)


def _folded(block: torch.Tensor, gain: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``block diag(gain)`` in float64 on ``device``."""
    block = block.to(device=device, dtype=torch.float64)
    return block if gain is None else block * gain.to(device=device, dtype=torch.float64)


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _gram(weight: torch.Tensor, gain: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``(W diag(g))^T (W diag(g))`` in float64, summed over row blocks of ``W``."""
    cols = weight.shape[1]
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=device)
    for start, stop in _row_blocks(*weight.shape):
        block = _folded(weight[start:stop], gain, device)
        gram.addmm_(block.T, block)
    return gram


def rotate_inputs(weight: torch.Tensor, q: torch.Tensor, gain: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W diag(gain) Q`` for a linear reading the residual (norm gain folded in), cast to ``dtype``.

    Computed in float64 on ``q``'s device one block of rows at a time, so the float64 working set
    is one block whatever the matrix (a 128256-row embedding included). ``out`` (any device) takes
    the result, and may be ``weight`` itself: each block is read before it is overwritten.
    """
    dtype = dtype or weight.dtype
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=q.device)
    for start, stop in _row_blocks(*weight.shape):
        out[start:stop] = (_folded(weight[start:stop], gain, q.device) @ q).to(dtype)
    return out


def rotate_outputs(weight: torch.Tensor, q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Q^T W`` for a linear writing into the residual (or ``Q^T b`` for its bias), cast to ``dtype``.

    float64 on ``q``'s device, one block of columns at a time.
    """
    dtype = dtype or weight.dtype
    if weight.dim() == 1:
        return (q.T @ weight.to(device=q.device, dtype=torch.float64)).to(dtype)
    rows, cols = weight.shape
    out = torch.empty(weight.shape, dtype=dtype, device=q.device)
    for start, stop in _row_blocks(cols, rows):
        out[:, start:stop] = (q.T @ weight[:, start:stop].to(device=q.device, dtype=torch.float64)).to(dtype)
    return out


def _rows(weight: torch.Tensor, rows: Slice | None) -> torch.Tensor:
    return weight if rows is None else weight[rows.start : rows.stop]


def attention_basis(layer: Tensors, adapter: Adapter, config: Any, device: torch.device) -> torch.Tensor:
    """The attention input basis of a layer: ``V`` of its (norm-folded) k_proj.

    Needs only two of the layer's tensors (the k_proj rows and the attention norm), which is all
    a converter must read ahead: layer ``l``'s down_proj writes into layer ``l+1``'s basis.
    """
    name, rows = adapter.attn_basis(config)
    gain = layer[f"{adapter.attn_norm}.weight"].to(device=device, dtype=torch.float64)
    return input_basis(_rows(layer[f"{name}.weight"], rows), gain)


def mlp_basis(layer: Tensors, adapter: Adapter, config: Any, device: torch.device) -> torch.Tensor:
    """The MLP input basis of a layer: ``V`` of its (norm-folded) gate_proj."""
    name, rows = adapter.mlp_basis(config)
    gain = layer[f"{adapter.mlp_norm}.weight"].to(device=device, dtype=torch.float64)
    return input_basis(_rows(layer[f"{name}.weight"], rows), gain)


def moment_basis(moments: torch.Tensor) -> torch.Tensor:
    """``Q`` (``d x d``, orthogonal, float64): the eigenvectors of a second moment ``E[x^T x]``, by decreasing
    eigenvalue (PCA without centering): in that basis an input's energy is packed into its first channels."""
    _, vectors = torch.linalg.eigh(moments.to(torch.float64))
    return vectors.flip(-1)


def has_shortcuts(wina: dict[str, Any]) -> bool:
    """Whether a checkpoint (its config.json ``wina`` block) stores shortcut rotations: transformed, and
    not into one pooled basis (whose shortcuts are all the identity)."""
    return bool(wina.get("transform")) and wina.get("basis", "svd") != "pooled"


def transform_layer(layer: Tensors, adapter: Adapter, config: Any, q_attn: torch.Tensor, q_next: torch.Tensor,
                    dtype: torch.dtype, q_mlp: torch.Tensor | None = None, shortcuts: bool = True) -> Tensors:
    """One decoder layer folded, rotated into its bases, with its two shortcut rotations.

    ``layer`` holds the original tensors (names relative to the layer, any device and dtype);
    ``q_attn`` is its attention basis and ``q_next`` the basis the residual must be in after the
    layer (the next layer's attention basis, or the identity after the last). Every product is
    float64 on ``q_attn``'s device; the result is cast to ``dtype`` and stays on that device.
    Folding is ``W <- W diag(g)`` for each linear reading a norm with gain ``g``, the gain then
    ones: exact because ``norm(h) * g`` feeds only those linears. ``q_mlp`` is the MLP input basis
    (None: ``V`` of gate_proj); ``shortcuts=False`` (one pooled basis, ``q_attn = q_mlp = q_next``)
    stores no shortcut.
    """
    device = q_attn.device
    q_mlp = mlp_basis(layer, adapter, config, device) if q_mlp is None else q_mlp
    norms = {adapter.attn_norm: (adapter.attn_inputs, q_attn), adapter.mlp_norm: (adapter.mlp_inputs, q_mlp)}
    reads = {name: (f"{norm}.weight", q) for norm, (names, q) in norms.items() for name in names}
    writes = {adapter.attn_output: q_mlp, adapter.mlp_output: q_next}
    out: Tensors = {}
    for key, tensor in layer.items():
        module, _, kind = key.rpartition(".")
        if module in reads and kind == "weight":
            norm, q = reads[module]
            out[key] = rotate_inputs(tensor, q, layer[norm], dtype)
        elif module in writes:
            out[key] = rotate_outputs(tensor, writes[module], dtype)
        elif module in norms:
            out[key] = torch.ones(tensor.shape, dtype=dtype, device=device)
        else:  # q/k/v biases, per-head q/k norms: untouched by input rotations
            out[key] = tensor.to(device=device, dtype=dtype)
    if shortcuts:
        out[ATTN_SHORTCUT] = shortcut_rotation(q_attn, q_mlp).to(dtype)
        out[MLP_SHORTCUT] = shortcut_rotation(q_mlp, q_next).to(dtype)
    return out


def shortcut_fraction(config: Any, gated_sizes: list[int], shortcuts: bool) -> float:
    """The bytes a layer reads densely beside its gated matrices, over theirs: its two ``d x d``
    shortcut rotations when it has them (``2 d^2 / sum of the gated matrices' sizes``), else 0."""
    return 2 * config.hidden_size**2 / sum(gated_sizes) if shortcuts else 0.0


def shortcut_rotation(q_from: torch.Tensor, q_to: torch.Tensor) -> torch.Tensor:
    """The ``nn.Linear`` weight that moves a residual from basis ``q_from`` to ``q_to``."""
    return q_to.T @ q_from


def rotate_embedding(embedding: torch.Tensor, q_attn0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token embeddings are residual vectors: ``E Q_attn(0)``, block by block, left on ``E``'s device.

    ``E`` stays where it is (the host, for a 1 GB table) and only one block at a time visits
    ``q_attn0``'s device. When ``E`` already has ``dtype`` it is overwritten in place (the caller
    gives it up), so the table is in memory once, not twice.
    """
    out = embedding if embedding.dtype == dtype else torch.empty(embedding.shape, dtype=dtype, device=embedding.device)
    return rotate_inputs(embedding, q_attn0, None, dtype, out=out)


def rotate_head(head: torch.Tensor, final_norm: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lm_head reading a residual stored in basis ``q`` (``--basis pooled``): ``W diag(g) Q``, the final
    norm's gain ``g`` folded in (the norm is then written with ones); left on ``W``'s device."""
    out = torch.empty(head.shape, dtype=dtype, device=head.device)
    return rotate_inputs(head, q, final_norm, dtype, out=out)


# --------------------------------------------------------------------------- per-head bases of the o_proj input

def value_head_bases(moments: torch.Tensor) -> torch.Tensor:
    """``[G, hd, hd]`` orthogonal bases from the second moments ``E[v v^T]`` of each KV head's values.

    The columns are the eigenvectors by decreasing eigenvalue (PCA without centering): in that basis
    a head's value energy is packed into its first channels, which magnitude gating can then keep.
    """
    _, vectors = torch.linalg.eigh(moments.to(torch.float64))
    return vectors.flip(-1)


def rotate_value_heads(layer: Tensors, adapter: Adapter, config: Any, bases: torch.Tensor) -> Tensors:
    """Rotate each KV head's values by its basis ``R_g``, exactly (``--head-bases``).

    The o_proj input of query head ``h`` is an attention-weighted sum of its KV head ``g``'s values,
    so rotating them (``v' = v R_g``: rows ``W_v[g] <- R_g^T W_v[g]``, bias ``b_v[g] <- R_g^T b_v[g]``)
    rotates that input, and ``W_o[:, h] <- W_o[:, h] R_g`` undoes it: ``o' W_o'^T = o R_g R_g^T W_o^T``.
    No weight is added, so the rotation is free at decode; with grouped-query attention every query
    head of a group shares its KV head's basis. Computed in float64, cast back to each tensor's dtype.
    """
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // groups
    value, rows = adapter.value_proj(config)
    start = 0 if rows is None else rows.start
    out = dict(layer)
    for kind in ("weight", "bias"):
        key = f"{value}.{kind}"
        if key not in layer:
            continue
        tensor = layer[key].to(torch.float64).clone()
        block = tensor[start : start + groups * head_dim].reshape(groups, head_dim, *tensor.shape[1:])
        rotated = torch.einsum("gji,gj...->gi...", bases.to(tensor.device), block)  # R_g^T block_g
        tensor[start : start + groups * head_dim] = rotated.reshape(groups * head_dim, *tensor.shape[1:])
        out[key] = tensor.to(layer[key].dtype)
    key = f"{adapter.attn_output}.weight"
    w_o = layer[key].to(torch.float64)
    cols = w_o.reshape(w_o.shape[0], groups, per_group, head_dim)
    cols = torch.einsum("ogph,ghk->ogpk", cols, bases.to(w_o.device))  # W_o[:, h] R_g
    out[key] = cols.reshape(w_o.shape).to(layer[key].dtype)
    return out
