"""Mistral: the Llama layout (sliding-window attention does not touch the weights)."""

from .base import Adapter


def _classes() -> tuple[type, type, type]:
    from transformers.models.mistral import modeling_mistral as m

    return m.MistralForCausalLM, m.MistralDecoderLayer, m.MistralRotaryEmbedding


ADAPTER = Adapter(name="mistral", model_types=("mistral",), classes=_classes)
