"""Quantized weights in the layout a gated kernel reads: one input channel's weights are one contiguous row.

A gated linear ``y = (x * m) W^T`` skips input channel ``i`` when its gate drops it, so the weights are
stored input-major, like the float kernels' ``W^T``: ``q`` is ``[in, out]`` and row ``i`` holds input
channel ``i``'s weight for every output. Each weight is

    w[o, i] = s[i // group_in, o // group_out] * q[i, o] + m[i // group_in, o // group_out]

with ``s`` the scales and ``m`` the offsets (absent: symmetric). Two group shapes occur:

* ``group_in == 1`` (our own quantizer): a row's groups run along the outputs, so an input channel's
  scales sit beside its weights and a dropped channel skips both;
* ``group_out == 1`` (imported GGUF blocks, compressed-tensors groups): ``group_in`` consecutive input
  channels of one output share a scale; the scale row of a group is read when any of its channels is kept.

Codes:

* int4: ``qweight`` is ``uint8 [in, out // 2]``, output ``2j`` in the low nibble of byte ``j`` and ``2j + 1``
  in the high one; the code ``q`` is the nibble ``n`` (0..15) with offsets, ``n - 8`` without (GGUF Q4_0,
  compressed-tensors' symmetric int4);
* int8: ``qweight`` is ``int8 [in, out]``, ``q`` the signed byte.

Dequantizing in float32 as written above reproduces GGUF's Q4_0 / Q4_1 / Q8_0 and compressed-tensors'
values exactly (each product of a float16 scale and a code of at most 8 bits is exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import WinaError

BITS = (4, 8)
# names of a quantized linear's tensors in a checkpoint, beside (instead of) ``{module}.weight``
QWEIGHT, SCALES, OFFSETS = "qweight", "scales", "offsets"


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight in the input-major layout of the module docstring."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return 4 if self.qweight.dtype == torch.uint8 else 8

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def group_in(self) -> int:
        return self.in_features // self.scales.shape[0]

    @property
    def group_out(self) -> int:
        return self.out_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes a dense read of this weight moves: the codes, the scales and the offsets."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets) if t is not None)

    def codes(self) -> torch.Tensor:
        """``q`` as ``int16 [in, out]`` (the signed code, offsets or not, as in the module docstring)."""
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        q = unpack_int4(self.qweight)
        return q if self.offsets is not None else q - 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` as ``[out, in]`` in ``dtype``, computed in float32 (exact for the schemes we import)."""
        s = _expand(self.scales.float(), self.group_in, self.group_out)
        w = s * self.codes().float()
        if self.offsets is not None:
            w = w + _expand(self.offsets.float(), self.group_in, self.group_out)
        return w.t().to(dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of a linear named ``prefix`` (``model.layers.0.mlp.down_proj``)."""
        out = {f"{prefix}.{QWEIGHT}": self.qweight, f"{prefix}.{SCALES}": self.scales}
        if self.offsets is not None:
            out[f"{prefix}.{OFFSETS}"] = self.offsets
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """The inverse of :meth:`tensors`; a layout it cannot read is refused in one line."""
        try:
            q = cls(tensors[f"{prefix}.{QWEIGHT}"], tensors[f"{prefix}.{SCALES}"], tensors.get(f"{prefix}.{OFFSETS}"))
        except KeyError as e:
            raise WinaError(f"{prefix}: a quantized linear needs {QWEIGHT} and {SCALES} tensors, {e.args[0]} is missing") from None
        q.check(prefix)
        return q

    def check(self, name: str = "weight") -> None:
        """Refuse codes, scales or offsets whose types or shapes do not describe one layout."""
        if self.qweight.dtype not in (torch.uint8, torch.int8) or self.qweight.dim() != 2:
            raise WinaError(f"{name}: quantized codes must be a 2-d uint8 (int4) or int8 tensor, got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if not self.scales.is_floating_point() or self.scales.dim() != 2:
            raise WinaError(f"{name}: scales must be a 2-d float tensor, got {self.scales.dtype} {tuple(self.scales.shape)}")
        rows, cols = self.scales.shape
        if rows == 0 or cols == 0 or self.in_features % rows or self.out_features % cols:
            raise WinaError(f"{name}: scales {tuple(self.scales.shape)} do not divide a [{self.in_features}, {self.out_features}] weight into groups")
        if self.group_in > 1 and self.group_out > 1:
            raise WinaError(f"{name}: groups run along the inputs or the outputs, not both ({self.group_in} x {self.group_out})")
        if self.offsets is not None and (self.offsets.shape != self.scales.shape or not self.offsets.is_floating_point()):
            raise WinaError(f"{name}: offsets must be float and shaped like the scales {tuple(self.scales.shape)}")


def _expand(t: torch.Tensor, group_in: int, group_out: int) -> torch.Tensor:
    """A ``[in / group_in, out / group_out]`` per-group tensor repeated to ``[in, out]``."""
    return t.repeat_interleave(group_in, dim=0).repeat_interleave(group_out, dim=1)


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """``[in, out]`` integers in 0..15 -> ``uint8 [in, out // 2]`` (output ``2j`` low, ``2j + 1`` high)."""
    if nibbles.shape[-1] % 2:
        raise WinaError(f"int4 weights need an even number of outputs, got {nibbles.shape[-1]}")
    n = nibbles.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [in, out // 2]`` -> ``int16 [in, out]`` nibbles (0..15), the inverse of :func:`pack_int4`."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``[out, in]`` with groups of ``group_size`` outputs per input row.

    int4 is asymmetric by default (a scale and an offset per group: codes 0..15 span the group's min..max),
    int8 symmetric (codes -127..127 span +-absmax). Scales and offsets are float16, and the codes are rounded
    against the stored float16 values, so :meth:`QuantizedWeight.dequantize` is the model that runs.
    """
    if bits not in BITS:
        raise WinaError(f"weights can be int4 or int8, not {bits} bits")
    symmetric = bits == 8 if symmetric is None else symmetric
    out, n_in = weight.shape
    if group_size < 1 or out % group_size:
        raise WinaError(f"a group size of {group_size} does not divide the {out} outputs of a [{out}, {n_in}] weight")
    w = weight.detach().t().float().reshape(n_in, out // group_size, group_size)  # [in, groups, G]
    tiny = torch.finfo(torch.float16).tiny
    if symmetric:
        top = 7 if bits == 4 else 127
        scales = (w.abs().amax(-1) / top).clamp_min(tiny).half()
        q = torch.round(w / scales.float()[..., None]).clamp(-top - (1 if bits == 4 else 0), top)
        offsets = None
        codes = (q + 8) if bits == 4 else q
    else:
        top = 15 if bits == 4 else 255
        low, high = w.amin(-1), w.amax(-1)
        scales = ((high - low) / top).clamp_min(tiny).half()
        offsets = low.half()
        codes = torch.round((w - offsets.float()[..., None]) / scales.float()[..., None]).clamp(0, top)
        if bits == 8:
            raise WinaError("int8 weights are symmetric")
    codes = codes.reshape(n_in, out)
    qweight = pack_int4(codes.to(torch.int16)) if bits == 4 else codes.to(torch.int8)
    return QuantizedWeight(qweight.contiguous(), scales.contiguous(), None if offsets is None else offsets.contiguous())


def quantize_gptq(weight: torch.Tensor, bits: int, group_size: int, hessian: torch.Tensor, damp: float = 0.01,
                  block: int = 128) -> QuantizedWeight:
    """Activation-aware quantization for this layout (GPTQ's error feedback): input rows are quantized one at a
    time, round to nearest per group of outputs as :func:`quantize_rtn` does, and each row's rounding error is
    pushed onto the rows not yet quantized through the inverse of ``hessian`` (``[in, in]``, ``sum_t x_t x_t^T`` of
    the layer's calibration inputs), which minimizes ``sum_t ||(W - Q) x_t||^2`` greedily.

    A per-input-channel scaling (AWQ's) cannot help here: a group lies within one input row, so scaling the row
    scales its groups and round to nearest returns the same codes. What an input row can still gain from the
    activations is the correlated rows' compensation, which is what this does. ``damp`` is added to the diagonal,
    relative to its mean; channels never active get a unit diagonal (their row is quantized as it is).
    """
    out, n_in = weight.shape
    w = weight.detach().t().double().clone()  # [in, out]: row i is input channel i
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += damp * h.diagonal().mean() * torch.eye(n_in, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H^-1 = U^T U
    rows: list[QuantizedWeight] = []
    for start in range(0, n_in, block):
        stop = min(start + block, n_in)
        errors = torch.zeros(stop - start, out, dtype=torch.float64)
        for i in range(start, stop):
            q = quantize_rtn(w[i][:, None].float(), bits, group_size)  # one input row, groups along the outputs
            rows.append(q)
            err = (w[i] - q.dequantize()[:, 0].double()) / u[i, i]
            w[i + 1 : stop] -= u[i, i + 1 : stop, None] * err[None, :]
            errors[i - start] = err
        w[stop:] -= u[start:stop, stop:].T @ errors
    offsets = None if rows[0].offsets is None else torch.cat([r.offsets for r in rows])
    return QuantizedWeight(torch.cat([r.qweight for r in rows]), torch.cat([r.scales for r in rows]), offsets)
