"""Mistral: the Llama layout (sliding-window attention does not touch the weights)."""

from .base import Adapter

ADAPTER = Adapter(name="mistral", model_types=("mistral",))
