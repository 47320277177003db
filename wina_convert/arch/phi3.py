"""Phi-3 / Phi-4: fused ``qkv_proj`` and ``gate_up_proj``; bases come from their k and gate rows."""

from dataclasses import dataclass
from typing import Any

from .base import Adapter, Slice


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Phi3Adapter(Adapter):
    def attn_basis(self, config: Any) -> tuple[str, Slice]:
        q_rows = config.num_attention_heads * _head_dim(config)
        kv_rows = config.num_key_value_heads * _head_dim(config)
        return "self_attn.qkv_proj", Slice(q_rows, q_rows + kv_rows)

    def value_proj(self, config: Any) -> tuple[str, Slice]:
        q_rows = config.num_attention_heads * _head_dim(config)
        kv_rows = config.num_key_value_heads * _head_dim(config)
        return "self_attn.qkv_proj", Slice(q_rows + kv_rows, q_rows + 2 * kv_rows)

    def mlp_basis(self, config: Any) -> tuple[str, Slice]:
        return "mlp.gate_up_proj", Slice(0, config.intermediate_size)

    def linear_outputs(self, name: str, config: Any) -> tuple[tuple[str, int], ...]:
        if name == "self_attn.qkv_proj":
            kv = config.num_key_value_heads * _head_dim(config)
            return (("q_proj", config.num_attention_heads * _head_dim(config)), ("k_proj", kv), ("v_proj", kv))
        if name == "mlp.gate_up_proj":
            return (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size))
        return super().linear_outputs(name, config)


def _classes() -> tuple[type, type, type]:
    from transformers.models.phi3 import modeling_phi3 as m

    return m.Phi3ForCausalLM, m.Phi3DecoderLayer, m.Phi3RotaryEmbedding


ADAPTER = Phi3Adapter(
    name="phi3",
    model_types=("phi3",),
    classes=_classes,
    attn_inputs=("self_attn.qkv_proj",),
    mlp_inputs=("mlp.gate_up_proj",),
)
