"""The modules swapped into a transformers model (gpt-fast style): gated linears, shortcut layers.

``GatedLinear`` replaces an ``nn.Linear``: input channel ``i`` of a token is kept when
``|x_i| > thresholds[i]``, where ``thresholds = t / column_norms`` (WINA) or ``t`` (TEAL). A fused
linear (Phi-3's qkv_proj) stacks several matrices, each with its own threshold row.

With a calibrated *center* ``c`` (``convert --center``, SCAP-style), the gate reads ``x - c`` instead:
``y = ((x - c) * [|x - c| > thr]) W^T + (b + W c)``. The constant ``W c`` is a bias, so at
thresholds 0 this is ``x W^T + b`` exactly, and no weight bytes are added.

With *top-k* gating (``set_topk``, the paper's evaluation protocol) each token keeps exactly its
``k`` highest-scoring channels per matrix, score ``|x_i - c_i| w_i`` (``w`` = column norms for
WINA, ones for TEAL), instead of comparing with calibrated thresholds.

With low-rank factors (``set_lowrank``, ``convert --lowrank``) the dropped channels are compensated:
``y = (x * m) W^T + ((x * (1 - m)) B_p^T) A_p^T + b`` per stacked matrix ``p`` (``wina_convert/lowrank.py``);
the term is 0 when nothing is dropped, and skipped while the gate is off.
``WinaDecoderLayer`` replaces a decoder layer of a transformed model: the same submodules plus the
two shortcut rotations that move the residual stream between the attention and MLP bases.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..quant import QuantizedWeight

# Signature of a fast kernel: (x, gated_linear) -> y, or None to fall back to the reference.
Kernel = Callable[[torch.Tensor, "GatedLinear"], "torch.Tensor | None"]


class GateContext:
    """State that the gates of ONE model share (``runtime/control.py`` gives each loaded model its own).

    ``epoch`` is bumped whenever one of the model's gates changes its thresholds: the model's recorded
    decode graphs (``runtime/graphs.py``) are stale then; another model's are not. ``valid`` is the
    ``[batch, positions]`` mask of the real (not padded) positions of the forward being run, set from
    its attention mask (``WinaControl``'s forward hook), so that the counters skip padding; ``prefill``
    says that forward feeds a prompt (several positions a sequence), so that a gate that does not gate
    prompts stays dense in all of it, the output head of a forward that keeps only the last position's
    logits included: the first generated token comes from a dense prompt.

    ``gated`` (set with ``gating``) is a ``[batch, positions]`` mask of the positions the gates act on in the
    forwards run meanwhile; the others run dense, uncounted. One forward over a prompt of ``P`` tokens and
    ``T`` more with positions ``>= P`` gated computes what a dense prefill and ``T`` gated decode steps
    compute (attention is causal): how ``wina eval --protocol deployed`` scores a generation in one pass.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.valid: torch.Tensor | None = None
        self.prefill = False  # the forward being run feeds several positions a sequence: a prompt (set with ``valid``)
        self.gated: torch.Tensor | None = None

    @contextlib.contextmanager
    def gating(self, positions: torch.Tensor) -> Iterator[None]:
        """Gate only ``positions`` (``[batch, positions]`` bool) in the forwards run inside the block."""
        previous, self.gated = self.gated, positions.bool()
        try:
            yield
        finally:
            self.gated = previous


class GatedLinear(nn.Module):
    """``y = (x * [|x| > thresholds]) W^T + b``, counting how many inputs it zeroes.

    ``splits`` are the output sizes of the stacked matrices (one entry for a plain linear);
    ``thresholds`` has one row per matrix. Prompt tokens (more than one position per sequence)
    are gated only when ``gate_prefill`` is set; a position mask (``GateContext.gating``) overrides
    that rule for the inputs whose positions it covers.
    """

    def __init__(self, linear: nn.Linear, splits: list[int], context: GateContext | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.splits = list(splits)
        self.register_buffer("thresholds", torch.zeros(len(splits), self.in_features, device=linear.weight.device), persistent=False)
        self.active = False
        self.drops = False  # its thresholds drop something (the low-rank term is needed on the kernel path)
        self.gate_prefill = True  # calibration gates whole windows; ``load`` turns it off (prompts dense)
        self.counting = True  # count with the masking reference (off: the kernel, if bound, runs)
        self.tally = False  # count on the kernel path too (set by the decode graphs for counting gates)
        self.context = context or GateContext()
        self.kernel: Kernel | None = None
        # integer counters on the weight's device: a CUDA graph replay adds to them, .to(dtype) leaves them alone
        self.register_buffer("zeroed", torch.zeros(len(splits), dtype=torch.int64, device=linear.weight.device), persistent=False)
        self.register_buffer("counted", torch.zeros((), dtype=torch.int64, device=linear.weight.device), persistent=False)
        self.center: torch.Tensor | None = None  # [in], or None: gate |x|
        self.center_bias: torch.Tensor | None = None  # [out] = W c
        self.topk: list[int] | None = None  # channels kept per matrix and token (top-k gating), or None: thresholds
        self.score_weights: torch.Tensor | None = None  # [P, in] the top-k scores' channel weights
        self.lowrank_a: torch.Tensor | None = None  # [out, r] (the stacked matrices' rows), weight dtype, or None
        self.lowrank_b: torch.Tensor | None = None  # [P, r, in]
        # the quantized weight (convert --weights; runtime/quantized.py hangs it on the linear), on the weight's device;
        # ``weight`` is then its dequantization, which the reference path computes with. None: a float weight.
        self.quant: "QuantizedWeight | None" = getattr(linear, "quant", None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}, active={self.active}"

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        """Per-channel thresholds ``[len(splits), in]``; all zeros (or ``active=False``) is dense."""
        self.thresholds = thresholds.to(device=self.weight.device, dtype=torch.float32).reshape(len(self.splits), -1)
        self.active = bool((self.thresholds > 0).any())
        self.drops = self.active  # stays False when the decode graphs force a dense gate onto its kernel
        self.context.epoch += 1

    @property
    def weight_bytes(self) -> int:
        """Bytes a dense read of the weight moves as stored (codes, scales and offsets when quantized)."""
        return self.quant.nbytes if self.quant is not None else self.weight.numel() * self.weight.element_size()

    @property
    def tokens(self) -> int:
        """Positions counted since ``reset_stats`` (padding excluded); reading it waits for the device."""
        return int(self.counted.item())

    def set_center(self, center: torch.Tensor | None) -> None:
        """Gate ``|x - center|`` and add ``W center`` back as a bias (None: gate ``|x|``)."""
        if center is None:
            self.center = self.center_bias = None
        else:
            self.center = center.to(device=self.weight.device, dtype=self.weight.dtype).reshape(self.in_features)
            with torch.no_grad():
                self.center_bias = F.linear(self.center.float(), self.weight.float()).to(self.weight.dtype)
        self.context.epoch += 1

    def set_lowrank(self, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Compensate the dropped channels by ``A_p (B_p z)`` (``a`` ``[out, r]``, ``b`` ``[P, r, in]``; None: off)."""
        if a is None or b is None or a.shape[-1] == 0:
            self.lowrank_a = self.lowrank_b = None
        else:
            self.lowrank_a = a.to(device=self.weight.device, dtype=self.weight.dtype).reshape(self.out_features, -1)
            self.lowrank_b = b.to(device=self.weight.device, dtype=self.weight.dtype).reshape(len(self.splits), -1, self.in_features)
        self.context.epoch += 1

    @property
    def lowrank_params(self) -> int:
        """Numbers in the factors (read at every gated step): ``r (P in + out)``."""
        return 0 if self.lowrank_a is None else self.lowrank_a.numel() + self.lowrank_b.numel()

    def lowrank_term(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[..., out]``: ``A_p (B_p (x * ~keep_p))`` for each stacked matrix ``p`` (``keep`` ``[..., P, in]``).

        Shapes depend on ``x``'s only (no data-dependent sizes): safe inside CUDA graphs and torch.compile.
        """
        if len(self.splits) == 1:
            dropped = torch.where(keep[..., 0, :], torch.zeros_like(x), x)
            return F.linear(F.linear(dropped, self.lowrank_b[0]), self.lowrank_a)
        outs, start = [], 0
        for m, size in enumerate(self.splits):
            dropped = torch.where(keep[..., m, :], torch.zeros_like(x), x)
            outs.append(F.linear(F.linear(dropped, self.lowrank_b[m]), self.lowrank_a[start : start + size]))
            start += size
        return torch.cat(outs, dim=-1)

    def set_topk(self, keep: list[int] | None, score_weights: torch.Tensor | None = None) -> None:
        """Keep each token's ``keep[p]`` best channels per matrix (None: back to thresholds)."""
        self.topk = None if keep is None else [int(k) for k in keep]
        self.score_weights = None if score_weights is None else score_weights.to(self.weight.device, torch.float32)
        if self.topk is not None:
            self.active = any(k < self.in_features for k in self.topk)
        else:
            self.active = bool((self.thresholds > 0).any())
        self.drops = self.active
        self.context.epoch += 1

    def _topk_keep(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., P, in]`` mask of each token's ``topk[p]`` highest scores."""
        scores = x.abs().float().unsqueeze(-2)
        if self.score_weights is not None:
            scores = scores * self.score_weights
        scores = scores.expand(*x.shape[:-1], len(self.splits), self.in_features)
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=x.device)
        for p, k in enumerate(self.topk):
            if k >= self.in_features:
                keep[..., p, :] = True
            elif k > 0:
                keep[..., p, :].scatter_(-1, scores[..., p, :].topk(k, dim=-1).indices, True)
        return keep

    def reset_stats(self) -> None:
        self.zeroed.zero_()
        self.counted.zero_()

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` must not round the thresholds: they stay float32 (on the weight's device), as in a
        model loaded in that dtype."""
        thresholds = self.thresholds
        super()._apply(fn, recurse)
        self.thresholds = thresholds.to(device=self.weight.device, dtype=torch.float32)
        # the center terms follow the weight (device and dtype), the top-k score weights its device
        if self.center is not None:
            self.center = self.center.to(device=self.weight.device, dtype=self.weight.dtype)
            self.center_bias = self.center_bias.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.score_weights is not None:
            self.score_weights = self.score_weights.to(device=self.weight.device)
        if self.lowrank_a is not None:
            self.lowrank_a = self.lowrank_a.to(device=self.weight.device, dtype=self.weight.dtype)
            self.lowrank_b = self.lowrank_b.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.quant is not None:  # codes, scales and offsets follow the weight's device, never its dtype
            q, dev = self.quant, self.weight.device
            self.quant = type(q)(q.qweight.to(dev), q.scales.to(dev), None if q.offsets is None else q.offsets.to(dev))
        return self

    def count(self, keep: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add the dropped inputs of ``keep`` ``[..., n_mats, in]`` to the counters, real positions only
        (and of those, only ``positions``, a mask of ``keep``'s leading shape, when given).

        Only device tensors change (no host sync), so a CUDA graph replay counts too.
        """
        flat = keep.reshape(-1, len(self.splits), self.in_features)
        valid = self.context.valid
        if valid is None or valid.numel() != flat.shape[0]:
            valid = positions
        elif positions is not None:
            valid = valid.reshape(positions.shape).to(positions.device) & positions
        if valid is not None and valid.numel() == flat.shape[0]:
            weight = valid.reshape(-1, 1, 1).to(device=flat.device)
            self.zeroed += ((~flat) & weight).sum(dim=(0, 2))
            self.counted += weight.sum()
        else:
            self.zeroed += (~flat).sum(dim=(0, 2))
            self.counted += flat.shape[0]

    def gated_positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """The context's position mask shaped like ``x``'s positions, or None (no mask, or one for other inputs:
        e.g. the output head of a forward that keeps only the last position's logits)."""
        gated = self.context.gated
        if gated is None or gated.numel() * self.in_features != x.numel():
            return None
        return gated.reshape(x.shape[:-1]).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.gated_positions(x)
        if positions is not None:
            return self._forward_positions(x, positions)
        if not self.active:
            if self.counting:  # a dense gate reads every column: counted (real positions), nothing zeroed
                valid = self.context.valid
                n = x.numel() // self.in_features
                self.counted += valid.sum().to(self.counted.device) if valid is not None and valid.numel() == n else n
            return F.linear(x, self.weight, self.bias)
        if not self.gate_prefill and (self.context.prefill or (x.dim() > 2 and x.shape[-2] > 1)):
            # an ungated prompt, not counted; the output head too where the forward keeps the last position only
            return F.linear(x, self.weight, self.bias)
        # (a centered gate never takes the kernel: kernels/hook.py binds no centered gate; see set_center)
        if self.kernel is not None and not self.counting and self.topk is None and self.center is None:
            y = self.kernel(x, self)
            if y is not None:
                if self.tally:
                    self.count(x.abs().unsqueeze(-2) > self.thresholds)
                return y
        return self._reference(x)

    def _forward_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Gated at ``positions`` (the masking reference), dense elsewhere; only gated positions are counted."""
        dense = F.linear(x, self.weight, self.bias)
        if not self.active:
            if self.counting:  # a dense gate at the gated positions: counted (real ones), nothing zeroed
                valid = self.context.valid
                real = positions if valid is None or valid.numel() != positions.numel() else positions & valid.reshape(positions.shape).to(positions.device)
                self.counted += real.sum().to(self.counted.device)
            return dense
        if not bool(positions.any()):
            return dense
        return torch.where(positions.unsqueeze(-1), self._reference(x, positions), dense)

    def _reference(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The masking reference: masked ``F.linear`` (counting the positions in ``positions`` if given, else all)."""
        bias = self.bias
        if self.center is not None:
            x = x - self.center
            bias = self.center_bias if bias is None else bias + self.center_bias
        keep = self._topk_keep(x) if self.topk is not None else x.abs().unsqueeze(-2) > self.thresholds  # [..., n_mats, in]
        if self.counting:
            self.count(keep, positions)
        if len(self.splits) == 1:
            y = F.linear(x * keep[..., 0, :], self.weight, bias)
        else:
            outs, start = [], 0
            for m, size in enumerate(self.splits):
                part = None if bias is None else bias[start : start + size]
                outs.append(F.linear(x * keep[..., m, :], self.weight[start : start + size], part))
                start += size
            y = torch.cat(outs, dim=-1)
        return y if self.lowrank_a is None else y + self.lowrank_term(x, keep)


class Shortcut(nn.Linear):
    """The rotation of the residual stream between two bases (a ``d x d`` orthogonal matrix)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__(dim, dim, bias=False, device=device, dtype=dtype)


class WinaDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual changes basis around each sub-block.

    ``h -> attn_shortcut(h) + attn(norm1(h))`` then ``h -> mlp_shortcut(h) + mlp(norm2(h))``, each
    sub-block's output through its post-sub-block norm first where the family has one (Gemma).
    It takes over the original layer's submodules, so parameter names (and the checkpoint) are
    the original ones plus ``attn_shortcut`` / ``mlp_shortcut``. Residual dropouts (Phi-3) are
    dropped: WINA checkpoints are for inference.
    """

    def __init__(self, layer: nn.Module, names: dict[str, str], shortcuts: tuple[Shortcut, Shortcut]):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for attr in ("attention_type", "layer_idx", "hidden_size"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self._names = names
        self.attn_shortcut, self.mlp_shortcut = shortcuts
        # (attention inputs, MLP inputs) kernel groups that also compute the shortcuts (kernels/hook.py, fuse_shortcuts)
        self.fused: tuple | None = None

    def _shortcut(self, index: int, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = None if self.fused is None else self.fused[index].decode_shortcut(h, x)
        if out is None:
            out = (self.attn_shortcut, self.mlp_shortcut)[index](h)
        return out

    def _post(self, name: str, y: torch.Tensor) -> torch.Tensor:
        """A sub-block's output as it joins the residual: through the family's post-sub-block norm, if any."""
        norm = self._names.get(name)
        return y if norm is None else getattr(self, norm)(y)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        n = self._names
        x = getattr(self, n["attn_norm"])(hidden_states)
        residual = self._shortcut(0, hidden_states, x)
        attn_out = getattr(self, n["attn_module"])(hidden_states=x, **kwargs)
        hidden_states = residual + self._post("attn_post_norm", attn_out[0] if isinstance(attn_out, tuple) else attn_out)
        x = getattr(self, n["mlp_norm"])(hidden_states)
        residual = self._shortcut(1, hidden_states, x)
        hidden_states = residual + self._post("mlp_post_norm", getattr(self, n["mlp_module"])(x))
        return hidden_states


class WinaModelMixin:
    """Put before a transformers ``XForCausalLM`` by ``load`` (``wina_model_class``), for two round trips.

    * ``save_pretrained`` writes a complete WINA checkpoint (``runtime/save.py``), never the rotated
      weights under the base model type (which plain transformers would run without the rotations).
    * ``.to(dtype)`` keeps float32 the non-persistent float32 buffers (the rotary ``inv_freq``), as a
      model loaded in that dtype has them: the result computes exactly like ``load(..., dtype=...)``.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                        **kwargs: Any) -> None:
        from ..errors import WinaError
        from .save import save_checkpoint

        unknown = sorted(set(kwargs) - {"safe_serialization", "is_main_process"})
        if unknown or kwargs.get("safe_serialization") is False:
            raise WinaError("save_pretrained of a WINA model writes safetensors only and takes max_shard_size; "
                            f"not {', '.join(unknown) or 'safe_serialization=False'}")
        if kwargs.get("is_main_process", True):
            from pathlib import Path

            save_checkpoint(self, Path(save_directory), shard_size=max_shard_size)

    def _apply(self, fn, recurse=True):
        kept = [(module, name, buf) for module in self.modules() for name, buf in module._buffers.items()
                if buf is not None and buf.dtype == torch.float32 and name in module._non_persistent_buffers_set
                and not isinstance(module, GatedLinear)]
        super()._apply(fn, recurse)
        for module, name, buf in kept:
            moved = module._buffers[name]
            module._buffers[name] = buf.to(device=moved.device)
        return self


@functools.lru_cache(maxsize=None)
def wina_model_class(causal_lm: type) -> type:
    """``causal_lm`` with ``WinaModelMixin`` in front (one class per family, made once)."""
    return type(causal_lm.__name__, (WinaModelMixin, causal_lm), {"__module__": __name__,
                                                                "__qualname__": causal_lm.__name__})
