"""Gemma 3 (text): "sandwich" norms, scaled embeddings, sliding-window layers; no ``--transform``.

A Gemma 3 decoder layer computes (transformers' ``Gemma3DecoderLayer``)::

    h <- h + post_attention_layernorm(attn(input_layernorm(h)))
    h <- h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

so each sub-block's output is normalized *before* it joins the residual: the gated o_proj and
down_proj write into a norm, not into the stream. The rest needs no code here because the runtime
runs transformers' own modules: RMSNorms scale by ``1 + w`` (``w`` stored, zero-centred), q and k
have per-head RMSNorms after the projections, the MLP is GeGLU (``gelu_pytorch_tanh``), q is wider
than the residual (4 heads x 256 = 1024 against 640 in the 270M model), the attention scale is
``query_pre_attn_scalar ** -0.5`` (transformers passes it as ``scaling``), and the embeddings are
tied. What calibration must reproduce outside a whole model is said by the methods below: the
embeddings are multiplied by ``sqrt(hidden)``, and each layer has its attention type (its own
rotary base, and a window of ``sliding_window`` positions for the sliding layers).

The transform is refused (docs/method.md section 2): it stores the residual rotated, ``h Q``, and
relies on a norm *without weight* commuting with ``Q``. A post-sub-block norm reads only the
sub-block's output ``y``; rotating the output linear (``Q^T W``) gives ``y Q``, and
``norm(y Q) * (1 + w) = (norm(y) Q) * (1 + w)``, which is not ``(norm(y) * (1 + w)) Q`` unless
``(1 + w)`` is constant: the gain cannot be folded into a consumer, because the consumer is the
residual stream itself.
"""

from dataclasses import dataclass
from typing import Any

from ..errors import WinaError
from .base import Adapter

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Gemma3Adapter(Adapter):
    def check(self, config: Any) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise WinaError("this Gemma 3 config uses bidirectional attention (an embedding model such as "
                            "EmbeddingGemma), not a causal language model: wina-convert cannot convert it")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise WinaError("this Gemma 3 config soft-caps attention logits (attn_logit_softcapping), which "
                            "wina-convert's calibration does not reproduce: not supported")

    def embed_scale(self, config: Any) -> float:
        return config.hidden_size**0.5

    def layer_type(self, config: Any, layer: int) -> str:
        return config.layer_types[layer]

    def sliding_window(self, config: Any, layer: int) -> int | None:
        return config.sliding_window if config.layer_types[layer] == SLIDING else None


def _classes() -> tuple[type, type, type]:
    from transformers.models.gemma3 import modeling_gemma3 as m

    return m.Gemma3ForCausalLM, m.Gemma3DecoderLayer, m.Gemma3RotaryEmbedding


ADAPTER = Gemma3Adapter(
    name="gemma3",
    model_types=("gemma3_text",),
    classes=_classes,
    mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    transform_refusal=("--transform is not supported for Gemma 3: its post-attention and post-feedforward norms "
                       "act on each sub-block's output before the residual add and do not commute with a "
                       "residual-stream rotation; convert with --no-transform"),
)

# Configs of the family that are refused with a reason instead of "unsupported architecture".
REFUSED = {
    "gemma3": ("the multimodal Gemma 3 (model_type 'gemma3', Gemma3ForConditionalGeneration) is not supported: "
               "wina-convert converts the text-only Gemma 3 (model_type 'gemma3_text', Gemma3ForCausalLM)"),
}
