"""Llama 2/3/3.x and SmolLM: the reference layout (optional o_proj/down_proj biases)."""

from .base import Adapter

ADAPTER = Adapter(name="llama", model_types=("llama",))
