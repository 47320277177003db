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

from ..errors import WinaError
from ..quant import QuantizedWeight, pack_int4

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


def check_gguf_types(path: Path, bits: int) -> None:
    """Before the file is read whole: refuse (one line) a GGUF whose layers' matrices ``--weights`` cannot keep
    exactly (a type other than Q4_0 / Q4_1 / Q8_0 or a float; Q8_0 into int4)."""
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
