"""Llama 2/3/3.x and SmolLM: the reference layout (optional o_proj/down_proj biases)."""

from .base import Adapter


def _classes() -> tuple[type, type, type]:
    from transformers.models.llama import modeling_llama as m

    return m.LlamaForCausalLM, m.LlamaDecoderLayer, m.LlamaRotaryEmbedding


ADAPTER = Adapter(name="llama", model_types=("llama",), classes=_classes)
