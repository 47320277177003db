"""``--calibration self`` with bounded memory (issue 18, item 7): above a size the layers are streamed.

The streamed model computes exactly what the whole one does (same modules, same float32 weights, same
seeded sampling), so the texts are identical; between forwards it holds no decoder-layer weight.
"""

from __future__ import annotations

import torch

from wina_convert.calibration import selfgen
from wina_convert.checkpoint.source import open_source


def test_streamed_sampling_equals_whole_model(tiny_models):
    source = open_source(tiny_models["qwen3"])
    whole = selfgen.self_generated_texts(source, samples=3, seq_len=24, seed=1)
    streamed = selfgen.self_generated_texts(source, samples=3, seq_len=24, seed=1, whole_model_bytes=0)
    assert streamed == whole and all(len(t) > 20 for t in whole)


def test_streamed_model_holds_one_layer_at_a_time(tiny_models):
    source = open_source(tiny_models["llama"])  # tied embeddings
    model = selfgen._streamed_model(source)
    layers = model.model.layers
    assert all(p.is_meta for p in layers.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    held = []
    for layer in layers:
        # runs after the streaming pre-hook (registered first): this layer's weights are in, no other's
        layer.register_forward_pre_hook(lambda m, a: held.append(sum(not p.is_meta for p in model.model.layers.parameters())))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    per_layer = sum(1 for _ in layers[0].parameters())
    assert held == [per_layer] * len(layers), "one layer's weights at a time"
    assert all(p.is_meta for p in layers.parameters()), "weights are dropped after each layer"
