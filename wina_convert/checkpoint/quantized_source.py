"""Quantized inputs whose values a quantized checkpoint keeps exactly (``convert --weights`` on them).

* A ``.gguf`` whose gated tensors are Q4_0, Q4_1 or Q8_0: each GGUF row is an output, its blocks of 32 inputs
  share a float16 scale (and, Q4_1, an offset), which is :mod:`wina_convert.quant`'s ``group_out == 1`` layout
  with ``group_in = 32``; the codes are re-laid out input-major, nothing is rounded. llama.cpp permutes the q/k
  rows of llama-family models for its rotary layout and transformers undoes it on load: the same permutation of
  output rows (found by running transformers' own processor on row indices) is applied to the codes and scales,
  exact because a block never spans two rows. Every tensor is checked against transformers' dequantization of
  the same file, value for value, before it is kept.

Other quantized types (Q4_K, Q6_K, ...) are refused in one line with ``--weights``: requantizing would stack a
second rounding on the first. Float tensors of a GGUF are quantized like any float model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WinaError, one_line
from ..quant import QuantizedWeight, pack_int4
from .source import Source

GGUF_BLOCK = 32
GGUF_EXACT = ("Q4_0", "Q4_1", "Q8_0")
GGUF_FLOAT = ("F32", "F16", "BF16")
# GGUF architecture names of our families (transformers' model_type -> gguf-py's)
GGUF_ARCH = {"gemma3_text": "gemma3"}


def gguf_quantized(path: Path, source: Any, adapter: Any, config: Any, bits: int) -> dict[str, QuantizedWeight]:
    """The gated linears of ``path`` kept exactly, by full module name (``model.layers.0.mlp.down_proj``), as
    ``bits``-bit codes (int8 holds a Q4 block's codes exactly too); float tensors are left to the quantizer."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

    arch_name = GGUF_ARCH.get(config.model_type, config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch_name), None)
    if arch is None:
        raise WinaError(f"{path.name}: gguf-py knows no architecture {arch_name!r}: cannot keep its quantized values")
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    out = {}
    for layer in range(config.num_hidden_layers):
        for linear in adapter.gated_linears():
            module = adapter.layer_key(layer, linear)
            gguf_name = f"{names.get_name(module)}.weight"
            tensor = tensors.get(gguf_name)
            if tensor is None:
                raise WinaError(f"{path.name} has no tensor {gguf_name} for {module}: cannot keep its quantized values")
            kind = tensor.tensor_type.name
            if kind in GGUF_FLOAT:
                continue
            if kind not in GGUF_EXACT:
                raise WinaError(f"{path.name}: {gguf_name} is {kind}; --weights keeps only {', '.join(GGUF_EXACT)} values exactly "
                                "(requantizing would round them twice): drop --weights to convert it to floats")
            if kind == "Q8_0" and bits == 4:
                raise WinaError(f"{path.name}: {gguf_name} is Q8_0, which int4 cannot hold exactly: use --weights int8")
            q = _gguf_weight(np.asarray(tensor.data), kind, bits, _row_order(config, gguf_name))
            weight = source.tensor(f"{module}.weight")
            if tuple(weight.shape) != (q.out_features, q.in_features) or not torch.equal(q.dequantize(torch.float32), weight.float()):
                raise WinaError(f"{path.name}: {gguf_name} ({kind}) re-laid out does not give transformers' values of {module}: "
                                "cannot keep it exactly; drop --weights")
            out[module] = q
    return out


def check_gguf_types(path: Path, bits: int, rotates: str | None = None) -> None:
    """Before the file is read whole: refuse (one line) a GGUF whose layers' matrices ``--weights`` cannot keep
    exactly (a type other than Q4_0 / Q4_1 / Q8_0 or a float; Q8_0 into int4; kept values that ``rotates``, the
    option that rotates the weights, would change)."""
    from gguf import GGUFReader

    for tensor in GGUFReader(str(path)).tensors:
        kind = tensor.tensor_type.name
        if not tensor.name.startswith("blk.") or not tensor.name.endswith(".weight") or len(tensor.shape) != 2:
            continue
        if kind not in GGUF_EXACT and kind not in GGUF_FLOAT:
            raise WinaError(f"{path.name}: {tensor.name} is {kind}; --weights keeps only {', '.join(GGUF_EXACT)} values exactly "
                            "(requantizing would round them twice): drop --weights to convert it to floats")
        if kind == "Q8_0" and bits == 4:
            raise WinaError(f"{path.name}: {tensor.name} is Q8_0, which int4 cannot hold exactly: use --weights int8")
        if kind in GGUF_EXACT and rotates:
            raise WinaError(f"{rotates} rotates the weights, so the quantized values of {path.name} cannot be kept: drop {rotates}")


def _row_order(config: Any, gguf_name: str) -> torch.Tensor | None:
    """The output rows of ``gguf_name`` in transformers' order (None: as stored): transformers' own GGUF processor
    for the architecture, run on the row indices."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    arch = GGUF_ARCH.get(config.model_type, config.model_type)
    processor = TENSOR_PROCESSORS.get(arch)
    if processor is None:
        return None
    heads = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    rows = _gguf_rows(config, gguf_name)
    if rows is None:
        return None
    index = np.arange(rows, dtype=np.int64)[:, None]
    result = processor(config=heads).process(weights=index, name=gguf_name, tensor_key_mapping={}, parsed_parameters={})
    order = torch.from_numpy(np.ascontiguousarray(result.weights)).reshape(-1)
    return None if torch.equal(order, torch.arange(rows)) else order


def _gguf_rows(config: Any, gguf_name: str) -> int | None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if ".attn_q." in gguf_name:
        return config.num_attention_heads * head_dim
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads * head_dim
    return None


def _gguf_weight(raw: np.ndarray, kind: str, bits: int, order: torch.Tensor | None) -> QuantizedWeight:
    """One GGUF tensor (``raw``: ``uint8 [out, blocks * block_bytes]``) as a ``group_out == 1`` QuantizedWeight."""
    data = torch.from_numpy(np.array(raw, dtype=np.uint8))  # a copy: the reader's array is a read-only map
    if order is not None:
        data = data[order]
    out = data.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = data.reshape(out, -1, size)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [out, blocks]
    offsets = None
    if kind == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(out, -1).to(torch.int16)  # [out, in] signed
    else:
        start = 4 if kind == "Q4_1" else 2
        if kind == "Q4_1":
            offsets = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
        packed = blocks[..., start : start + 16]
        # a block's weights 0..15 are its 16 bytes' low nibbles, 16..31 their high ones
        codes = torch.cat((packed & 0xF, packed >> 4), dim=-1).reshape(out, -1).to(torch.int16)  # nibbles 0..15
    codes = codes.t().contiguous()  # [in, out]
    scales, offsets = scales.t().contiguous(), None if offsets is None else offsets.t().contiguous()
    if bits == 4:  # Q4_0's and Q4_1's nibbles as stored (Q4_0: code n - 8, the layout's symmetric int4)
        qweight = pack_int4(codes)
    elif kind == "Q8_0":
        qweight = codes.to(torch.int8)
    else:  # a Q4 block widened to int8 codes: the signed code itself (n - 8 for Q4_0, n with Q4_1's offset)
        qweight = (codes if kind == "Q4_1" else codes - 8).to(torch.int8)
    q = QuantizedWeight(qweight, scales, offsets)
    q.check()
    return q


# --------------------------------------------------------------------------- compressed-tensors

PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def is_compressed(directory: Path) -> bool:
    """A directory whose config.json says compressed-tensors (what llm-compressor writes)."""
    from .format import read_config_json

    quant = read_config_json(directory, "a Hugging Face model directory").get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def _weight_args(quant: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
    """The weight arguments of each config group; anything but weight-only pack-quantized int4 / int8 in groups
    of inputs (or per output channel) is refused in one line."""
    groups = list((quant.get("config_groups") or {}).values())
    refusal = (f"{directory.name} is compressed-tensors {{}}: --weights keeps only weight-only pack-quantized int4 / int8 "
               "values (groups or channels); dequantize it first")
    if not groups:
        raise WinaError(refusal.format("without config groups"))
    out = []
    for group in groups:
        fmt = group.get("format") or quant.get("format")
        weights = group.get("weights") or {}
        if fmt != "pack-quantized":
            raise WinaError(refusal.format(f"format {fmt}"))
        if group.get("input_activations") or group.get("output_activations"):
            raise WinaError(refusal.format("with quantized activations"))
        if weights.get("type") != "int" or weights.get("num_bits") not in (4, 8) or weights.get("strategy") not in ("group", "channel"):
            raise WinaError(refusal.format(f"{weights.get('type')}{weights.get('num_bits')} by {weights.get('strategy')}"))
        if weights.get("dynamic") or weights.get("actorder") not in (None, "static", "weight"):
            raise WinaError(refusal.format(f"with activation order {weights.get('actorder')}"))
        if weights.get("strategy") == "channel":
            weights = {**weights, "group_size": None}
        out.append(weights)
    return out


class CompressedSource(Source):
    """A compressed-tensors directory read as floats (each packed linear's ``weight`` dequantized as the library
    does: ``(q - zero_point) * scale`` in the scale's dtype) that can also give its codes as they are."""

    def __init__(self, base: Source, packed: dict[str, int]):
        super().__init__(config=base.config, base=base.base, tokenizer_source=base.tokenizer_source,
                         generation_config=base.generation_config, files=base.files, origin=base.origin)
        self.packed = packed  # module -> bits

    @property
    def names(self) -> list[str]:
        hidden = {f"{m}.{p}" for m in self.packed for p in PACKED}
        return [n for n in self.files if n not in hidden] + [f"{m}.weight" for m in self.packed]

    def has(self, name: str) -> bool:
        return name.removesuffix(".weight") in self.packed or super().has(name)

    def tensor(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.packed:
            return self.quantized(module).dequantize(self.dtype_of(name))
        return super().tensor(name)

    def numel(self, name: str) -> int:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.packed:
            return int(super().tensor(f"{module}.weight_shape").prod())
        return super().numel(name)

    def dtype_of(self, name: str) -> torch.dtype | None:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.packed:
            return super().dtype_of(f"{module}.weight_scale")
        return super().dtype_of(name)

    def quantized(self, module: str, bits: int | None = None) -> QuantizedWeight:
        """The linear ``module``'s values in the input-major layout (``group_out == 1``): int4 codes as nibbles
        ``q + 8`` (the layout's symmetric int4), or widened to int8 (``bits=8``); a zero point ``z`` becomes the
        offset ``-s (z + 8)`` (int4 nibbles) or ``-s z`` (int8), exact in float32."""
        own = self.packed[module]
        bits = bits or own
        if own == 8 and bits == 4:
            raise WinaError(f"{module} is int8 in the compressed-tensors input, which int4 cannot hold exactly: use --weights int8")
        packed = super().tensor(f"{module}.weight_packed")
        scale = super().tensor(f"{module}.weight_scale")
        out, inp = (int(v) for v in super().tensor(f"{module}.weight_shape"))
        if scale.dim() != 2 or scale.shape[0] != out or inp % scale.shape[1] or packed.shape[0] != out:
            raise WinaError(f"{module}: compressed-tensors scales {tuple(scale.shape)} do not fit a [{out}, {inp}] weight")
        # dense int32 packing, element i at bit i * bits of its row (little-endian): bytes hold 2 nibbles or 1 code
        raw = packed.contiguous().view(torch.uint8).reshape(out, -1)
        if own == 4:
            raw = torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(out, -1)
        signed = raw[:, :inp].to(torch.int16) - (8 if own == 4 else 128)  # the library's signed code q  [out, in]
        zero = None
        if self.has_part(module, "weight_zero_point"):
            zp = super().tensor(f"{module}.weight_zero_point").contiguous()  # packed along the outputs
            zb = zp.t().contiguous().view(torch.uint8).reshape(zp.shape[1], -1)
            if own == 4:
                zb = torch.stack((zb & 0xF, zb >> 4), dim=-1).reshape(zp.shape[1], -1)
            zero = (zb[:, :out].to(torch.int16) - (8 if own == 4 else 128)).t()  # [out, groups]
        s = scale.t().contiguous()  # [groups, out]
        if bits == 4:
            qweight = pack_int4((signed + 8).t().contiguous())  # nibble n = q + 8
            shift = 8
        else:
            qweight = signed.t().contiguous().to(torch.int8)
            shift = 0
        offsets = None if zero is None else -(s.float() * (zero.t().float() + shift))
        q = QuantizedWeight(qweight, s, offsets)
        q.check(module)
        # the library's dequantization, (q - z) * s in the scale's dtype, value for value
        groups = inp // scale.shape[1]
        want = signed.to(scale.dtype)
        if zero is not None:
            want = want - zero.repeat_interleave(groups, dim=1).to(scale.dtype)
        want = want * scale.repeat_interleave(groups, dim=1)
        if not torch.equal(q.dequantize(scale.dtype), want):
            raise WinaError(f"{module}: the compressed-tensors values re-laid out differ from the library's dequantization: drop --weights")
        return q

    def has_part(self, module: str, part: str) -> bool:
        return f"{module}.{part}" in self.files


def open_if_compressed(directory: Path, *, model_id: str | None = None, revision: str | None = None) -> CompressedSource | None:
    """``open_directory``'s opener for ``convert --weights``: a compressed-tensors directory, or None (read as usual)."""
    return open_compressed(directory, model_id=model_id, revision=revision) if is_compressed(directory) else None


def open_compressed(directory: Path, *, model_id: str | None = None, revision: str | None = None) -> CompressedSource:
    """A compressed-tensors directory with weight-only pack-quantized linears, read as floats (the quantization
    config set aside, nothing else refused) and able to give its codes as they are."""
    from transformers import AutoConfig, GenerationConfig

    from ..arch import adapter_for
    from .format import read_config_json
    from .source import safetensors_files

    raw = read_config_json(directory, "a Hugging Face model directory")
    args = _weight_args(raw.pop("quantization_config"), directory)
    bits = {a["num_bits"] for a in args}
    if len(bits) > 1:
        raise WinaError(f"{directory.name} mixes int4 and int8 groups; --weights keeps one width: dequantize it first")
    adapter_for(raw.get("model_type", "<missing model_type>"))
    raw.pop("auto_map", None)
    try:
        config = AutoConfig.for_model(**raw)
    except Exception as e:  # transformers raises many types for bad configs
        raise WinaError(f"cannot read {directory / 'config.json'}: {one_line(e)}") from e
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        generation = None
    files = safetensors_files(directory)
    base = Source(config=config, base={"id": model_id or directory.name, "revision": revision, "sha256": None},
                  tokenizer_source=directory, generation_config=generation, files=files, origin=[directory])
    packed = {name.removesuffix(".weight_packed"): next(iter(bits)) for name in files if name.endswith(".weight_packed")}
    if not packed:
        raise WinaError(f"{directory.name} says compressed-tensors but has no packed weights")
    return CompressedSource(base, packed)


def compressed_quantized(source: CompressedSource, adapter: Any, config: Any, bits: int) -> dict[str, QuantizedWeight]:
    """The packed gated linears of ``source`` kept exactly, by full module name (the unpacked ones are floats)."""
    out = {}
    for layer in range(config.num_hidden_layers):
        for linear in adapter.gated_linears():
            module = adapter.layer_key(layer, linear)
            if module in source.packed:
                out[module] = source.quantized(module, bits)
    return out
