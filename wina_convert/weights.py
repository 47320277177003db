"""What a checkpoint's gated matrices are stored as (``convert --weights``), and convert's quantize stage.

A checkpoint's ``wina`` block (config.json) and its sidecar record carry ``weights``, a :class:`WeightFormat`:
``float`` (the matrices as ``{module}.weight``, as before), ``int4`` or ``int8`` (``{module}.qweight``,
``.scales``, ``.offsets`` in :mod:`wina_convert.quant`'s input-major layout). A quantized checkpoint is
format version 2, so an older wina-convert refuses it in one line instead of loading random weights, and its
``model_type`` is ``wina-convert``, so plain transformers refuses it too.

The stage runs per layer, right after the layer is transformed: each gated matrix is quantized (round to
nearest per group of ``group_size`` outputs of one input row) or, from a quantized source, taken as it is
(``checkpoint/quantized_source.py``), and the layer's float weights are replaced by the dequantized ones, so
that column norms, calibration and the searches see the model that runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import WinaError
from .quant import QuantizedWeight, quantize_rtn

SCHEMES = {"float": None, "int4": 4, "int8": 8}
DEFAULT_GROUP_SIZE = 64  # outputs per scale group: divides every gated matrix of Llama/Qwen/SmolLM2/Gemma shapes
QUANTIZED_FORMAT_VERSION = 2  # checkpoints whose gated matrices are quantized (float ones stay version 1)


@dataclass(frozen=True)
class WeightFormat:
    """How the gated matrices are stored: ``scheme`` float / int4 / int8; ``group_size`` the outputs per scale
    group of our quantizer (None: float, or each tensor's own groups, imported); ``source`` rtn (quantized by
    convert) or the quantized input whose values were kept (gguf, compressed-tensors)."""

    scheme: str = "float"
    group_size: int | None = None
    source: str = "rtn"

    @property
    def bits(self) -> int | None:
        return SCHEMES[self.scheme]

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "source": self.source if self.quantized else None,
                "layout": "input-major" if self.quantized else None}

    @classmethod
    def from_dict(cls, record: Any) -> "WeightFormat":
        """The record of a checkpoint (None: float, as every checkpoint before ``--weights``); a scheme this
        version does not know is refused in one line."""
        if record is None:
            return cls()
        scheme = record.get("scheme") if isinstance(record, dict) else record
        if scheme not in SCHEMES:
            raise WinaError(f"this checkpoint's weights are {scheme!r}, which this wina-convert cannot read "
                            f"(it reads {', '.join(SCHEMES)}): upgrade wina-convert")
        return cls(scheme, record.get("group_size"), record.get("source") or "rtn")

    def describe(self) -> str:
        """``int4 (groups of 64 outputs)``, ``int4 (kept from gguf)``, ``float``."""
        if not self.quantized:
            return "float"
        return f"{self.scheme} (kept from {self.source})" if self.source != "rtn" else f"{self.scheme} (groups of {self.group_size} outputs)"


def parse_weights(weights: str | None, group_size: int | None = None) -> WeightFormat:
    """``--weights`` and ``--group-size`` as a format (None or ``float``: float weights, no group size)."""
    scheme = weights or "float"
    if scheme not in SCHEMES:
        raise WinaError(f"unknown --weights {scheme!r}: use int4, int8 or float")
    if SCHEMES[scheme] is None:
        if group_size is not None:
            raise WinaError("--group-size is for quantized weights: add --weights int4 or int8")
        return WeightFormat()
    size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
        raise WinaError(f"--group-size must be an even number of outputs >= 2, got {group_size!r}")
    return WeightFormat(scheme, size)


def check_group_size(fmt: WeightFormat, matrices: dict[str, list[int]]) -> None:
    """Before any work: the group size divides the outputs of every stacked matrix of every gated linear
    (``matrices[name]``: its matrices' output sizes), so that no group straddles two matrices of a fused linear."""
    if not fmt.quantized or fmt.group_size is None:
        return
    for name, sizes in matrices.items():
        for size in sizes:
            if size % fmt.group_size:
                raise WinaError(f"--group-size {fmt.group_size} does not divide the {size} outputs of {name}"
                                f"{' (one of its stacked matrices)' if len(sizes) > 1 else ''}: use a divisor of it")


def weight_bytes(weight: torch.Tensor, quant: QuantizedWeight | None) -> int:
    """Bytes a dense read of a matrix moves as stored: codes, scales and offsets, or the float weight."""
    return quant.nbytes if quant is not None else weight.numel() * weight.element_size()


class QuantizeStage:
    """Convert's per-layer quantization: quantize (or take as imported) each gated matrix, hand the dequantized
    floats on to the column norms and the calibrator, and give the tensors to write in their place."""

    def __init__(self, fmt: WeightFormat, imported: dict[str, QuantizedWeight] | None = None):
        self.format = fmt
        self.imported = dict(imported or {})

    def layer(self, prefix: str, final: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, QuantizedWeight]:
        """Quantize the gated linears ``names`` of the layer at ``prefix`` (``model.layers.3.``); ``final[f"{n}.weight"]``
        becomes the dequantized weight (same dtype and device). Returns the quantized weights by relative name."""
        packed = {}
        for name in names:
            key = f"{name}.weight"
            weight = final[key]
            q = self.imported.pop(prefix + name, None)
            if q is None:
                q = quantize_rtn(weight, self.format.bits, self.format.group_size)
            if (q.out_features, q.in_features) != tuple(weight.shape):
                raise WinaError(f"{prefix}{name}: the quantized weight is {q.out_features} x {q.in_features}, the model's {tuple(weight.shape)}")
            final[key] = q.dequantize(weight.dtype).to(weight.device)
            packed[name] = q
        return packed

    @staticmethod
    def stored(final: dict[str, torch.Tensor], packed: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
        """The layer's tensors to write: each quantized linear's codes, scales and offsets in place of its weight."""
        out = {name: t for name, t in final.items() if name.removesuffix(".weight") not in packed}
        for name, q in packed.items():
            out.update(q.tensors(name))
        return out

    @staticmethod
    def byte_scale(final: dict[str, torch.Tensor], packed: dict[str, QuantizedWeight]) -> float:
        """The layer's gated bytes as floats over as stored: the factor that turns an extra fraction counted in
        float bytes (shortcut rotations, low-rank factors: read in the float dtype) into one of stored bytes."""
        floats = sum(weight_bytes(final[f"{name}.weight"], None) for name in packed)
        return floats / sum(q.nbytes for q in packed.values()) if packed else 1.0


def quantize_stage(fmt: WeightFormat, source: Any, adapter: Any, config: Any, shapes: dict[str, tuple[int, int, int]],
                   rotates: str | None) -> QuantizeStage | None:
    """Convert's quantize stage for ``fmt`` (None: float weights). A quantized source (a GGUF of Q4_0 / Q4_1 / Q8_0
    gated tensors) keeps its values, which a weight rotation (``rotates``: the option that rotates, or None) would
    change: refused then. ``shapes`` are the first layer's gated linears' ``(out, in, matrices)``."""
    if not fmt.quantized:
        return None
    imported: dict[str, QuantizedWeight] = {}
    origin = source.origin[0] if source.origin else None
    from .checkpoint.quantized_source import CompressedSource, compressed_quantized, gguf_quantized

    if isinstance(source, CompressedSource):
        imported, kept_from = compressed_quantized(source, adapter, config, fmt.bits), "compressed-tensors"
    elif origin is not None and origin.suffix == ".gguf":
        imported, kept_from = gguf_quantized(origin, source, adapter, config, fmt.bits), "gguf"
    if imported and rotates:
        raise WinaError(f"{rotates} rotates the weights, so the quantized values of {origin.name} cannot be kept: drop {rotates}")
    if len(imported) < len(shapes) * config.num_hidden_layers:  # some matrices are quantized here
        check_group_size(fmt, {name: adapter.splits(name, config, out) for name, (out, _, _) in shapes.items()})
    elif imported:
        fmt = WeightFormat(fmt.scheme, None, kept_from)
    return QuantizeStage(fmt, imported)
