"""Qwen3: per-head q/k RMSNorms act after the projections, so input rotations leave them alone."""

from .base import Adapter

ADAPTER = Adapter(name="qwen3", model_types=("qwen3",))
