"""Qwen2/2.5: the Llama layout with q/k/v biases, which input rotations leave unchanged."""

from .base import Adapter

ADAPTER = Adapter(name="qwen2", model_types=("qwen2",))
