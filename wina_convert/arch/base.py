"""The adapter interface: every architecture difference the algorithm needs, in one place.

The transform, calibration and runtime speak only of *roles* (the attention input, the linears
that read it, the matrix whose right-singular vectors give its basis, ...). An adapter maps those
roles to the tensor names of one model family. Adding a family means adding one small file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Slice:
    """Rows ``start:stop`` of a (possibly fused) weight matrix."""

    start: int
    stop: int


@dataclass(frozen=True)
class Adapter:
    """Tensor names of one decoder-only family, relative to ``{layers_prefix}.{i}.``.

    ``attn_inputs``/``mlp_inputs`` read the normalized residual; ``attn_output``/``mlp_output``
    write into it, through ``attn_post_norm``/``mlp_post_norm`` where the family normalizes a
    sub-block's output before the residual add (Gemma's "sandwich" norms; None: straight in).
    ``*_basis`` name the linear (and the rows of it, for fused projections) whose right-singular
    vectors become the sub-block's input basis. ``transform_refusal`` says why ``--transform`` is
    refused for the family (None: supported).
    """

    name: str
    model_types: tuple[str, ...]
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    transform_refusal: str | None = None
    attn_module: str = "self_attn"
    mlp_module: str = "mlp"
    # () -> (XForCausalLM, XDecoderLayer, XRotaryEmbedding) of the family, imported from transformers on call
    classes: Callable[[], tuple[type, type, type]] | None = None
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layers_prefix: str = "model.layers"

    def attn_basis(self, config: Any) -> tuple[str, Slice | None]:
        """The matrix (and rows) whose V rotates the attention input: k_proj."""
        return "self_attn.k_proj", None

    def mlp_basis(self, config: Any) -> tuple[str, Slice | None]:
        """The matrix (and rows) whose V rotates the MLP input: gate_proj."""
        return "mlp.gate_proj", None

    def check(self, config: Any) -> None:
        """Refuse a config of this family that the adapter does not cover (raises ``WinaError``)."""

    def embed_scale(self, config: Any) -> float | None:
        """The factor the model multiplies its token embeddings by (None: used as stored)."""
        return None

    def layer_type(self, config: Any, layer: int) -> str | None:
        """The key of layer ``layer``'s rotary embedding when the family has several (None: one for all)."""
        return None

    def sliding_window(self, config: Any, layer: int) -> int | None:
        """How many positions back (the query's own included) layer ``layer`` attends; None: all of them."""
        return None

    def value_proj(self, config: Any) -> tuple[str, Slice | None]:
        """The linear (and its rows, for fused projections) that computes the attention's values."""
        return "self_attn.v_proj", None

    def gated_linears(self) -> tuple[str, ...]:
        """Every linear whose input is gated, in layer order."""
        return (*self.attn_inputs, self.attn_output, *self.mlp_inputs, self.mlp_output)

    def linear_outputs(self, name: str, config: Any) -> tuple[tuple[str, int], ...]:
        """The logical matrices stacked in a (possibly fused) linear, with their row counts.

        Unfused linears hold one matrix named after their last component.
        """
        return ((name.rsplit(".", 1)[-1], -1),)

    def splits(self, name: str, config: Any, out_features: int) -> list[int]:
        """Row counts of the matrices stacked in linear ``name`` (``[out_features]`` if unfused)."""
        parts = self.linear_outputs(name, config)
        return [out_features] if parts[0][1] == -1 else [rows for _, rows in parts]

    def layer_key(self, layer: int, name: str) -> str:
        return f"{self.layers_prefix}.{layer}.{name}"

    def model_classes(self) -> tuple[type, type, type]:
        """``(XForCausalLM, XDecoderLayer, XRotaryEmbedding)`` of the family, from transformers."""
        if self.classes is None:
            raise NotImplementedError(f"the {self.name} adapter names no transformers classes")
        return self.classes()

    def layer_names(self) -> dict[str, str | None]:
        """The decoder layer's submodules by role, as ``WinaDecoderLayer`` looks them up."""
        return {"attn_module": self.attn_module, "mlp_module": self.mlp_module,
                "attn_norm": self.attn_norm, "mlp_norm": self.mlp_norm,
                "attn_post_norm": self.attn_post_norm, "mlp_post_norm": self.mlp_post_norm}


def expected_shapes(adapter: Adapter, config: Any, layer: int) -> dict[str, tuple[int | None, ...]]:
    """Shapes the config implies for the embedding and one layer's tensors (None: not implied)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    key = lambda name: adapter.layer_key(layer, name)  # noqa: E731
    shapes: dict[str, tuple[int | None, ...]] = {adapter.embed: (config.vocab_size, hidden)}
    for name in adapter.attn_inputs:
        shapes[key(f"{name}.weight")] = (None, hidden)
    shapes[key(f"{adapter.attn_output}.weight")] = (hidden, None)
    for name in adapter.mlp_inputs:
        parts = adapter.linear_outputs(name, config)
        rows = inter if parts[0][1] == -1 else sum(r for _, r in parts)
        shapes[key(f"{name}.weight")] = (rows, hidden)
    shapes[key(f"{adapter.mlp_output}.weight")] = (hidden, inter)
    shapes[key(f"{adapter.attn_norm}.weight")] = (hidden,)
    shapes[key(f"{adapter.mlp_norm}.weight")] = (hidden,)
    for norm in (adapter.attn_post_norm, adapter.mlp_post_norm):
        if norm is not None:
            shapes[key(f"{norm}.weight")] = (hidden,)
    return shapes


def check_shapes(adapter: Adapter, config: Any, names: list[str], shape_of: Any) -> None:
    """Refuse weights that do not fit the config (first and last layer checked, plus layer count).

    ``shape_of(name)`` returns a tensor's shape. Raises ``WinaError`` naming the first mismatch.
    """
    from ..errors import WinaError

    count = config.num_hidden_layers
    prefix = f"{adapter.layers_prefix}."
    present = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    if present != set(range(count)):
        raise WinaError(f"config and weights do not match: the config says {count} layers, the weights have "
                        f"{len(present)} (layers {min(present, default=0)}..{max(present, default=-1)})")
    for layer in sorted({0, count - 1}):
        for name, want in expected_shapes(adapter, config, layer).items():
            if name not in names:
                raise WinaError(f"config and weights do not match: the weights have no {name}")
            got = tuple(shape_of(name))
            if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                shown = "x".join("?" if w is None else str(w) for w in want)
                raise WinaError(f"config and weights do not match: {name} is {'x'.join(map(str, got))}, "
                                f"the config implies {shown}")
