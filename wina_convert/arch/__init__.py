"""Architecture adapters, one module per family; ``adapter_for`` picks one from a config."""

from __future__ import annotations

from ..errors import WinaError
from . import gemma3, llama, mistral, phi3, qwen2, qwen3
from .base import Adapter, Slice

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, mistral.ADAPTER, qwen2.ADAPTER, qwen3.ADAPTER, phi3.ADAPTER,
                                 gemma3.ADAPTER)
# model types refused with their own reason (a sibling of a supported family)
REFUSED: dict[str, str] = {**gemma3.REFUSED}


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of ``model_type``, or a one-line error naming the supported families."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if model_type in REFUSED:
        raise WinaError(REFUSED[model_type])
    raise WinaError(
        f"unsupported architecture {model_type!r}: wina-convert supports {', '.join(supported_model_types())}"
    )


__all__ = ["Adapter", "Slice", "ADAPTERS", "adapter_for", "supported_model_types"]
