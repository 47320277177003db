"""Qwen3: per-head q/k RMSNorms act after the projections, so input rotations leave them alone."""

from .base import Adapter


def _classes() -> tuple[type, type, type]:
    from transformers.models.qwen3 import modeling_qwen3 as m

    return m.Qwen3ForCausalLM, m.Qwen3DecoderLayer, m.Qwen3RotaryEmbedding


ADAPTER = Adapter(name="qwen3", model_types=("qwen3",), classes=_classes)
