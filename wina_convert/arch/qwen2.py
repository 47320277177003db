"""Qwen2/2.5: the Llama layout with q/k/v biases, which input rotations leave unchanged."""

from .base import Adapter


def _classes() -> tuple[type, type, type]:
    from transformers.models.qwen2 import modeling_qwen2 as m

    return m.Qwen2ForCausalLM, m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding


ADAPTER = Adapter(name="qwen2", model_types=("qwen2",), classes=_classes)
