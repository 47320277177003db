"""The quantized kernel hook (runtime/kernels/quant_hook.py) on CPU, where ``quant_gated_linear`` computes with
the dequantized weight: grouping, packing, column slices and thresholds against the masking reference of a
model whose float weights are the dequantized ones."""

from __future__ import annotations

import pytest
import torch

from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.quant import quantize_rtn
from wina_convert.runtime.kernels.hook import bind_kernels, input_groups, set_sparse_batch
from wina_convert.runtime.kernels.quant_hook import QuantSharedInput


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-hook") / "qwen2"
    convert(tiny_models["qwen2"], out, sparsity=0.5, transform=False, quiet=True, samples=4, seq_len=64)
    return out


def _quantized(path, sparsity, bits):
    """The checkpoint with every gated linear quantized (``gl.quant``) and its float weight replaced by the
    dequantized one, so the masking reference computes the quantized model."""
    model = load(path, sparsity=sparsity, dtype=torch.float32, gate_prefill=True)
    with torch.no_grad():
        for gate in model.wina.gates.values():
            gate.quant = quantize_rtn(gate.weight.float(), bits, 8)
            gate.weight.copy_(gate.quant.dequantize())
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_hooks_equal_the_masking_reference(checkpoint, bits, sparsity):
    model = _quantized(checkpoint, sparsity, bits)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_prompt = model(ids).logits
        want_step = model(ids[:, :1]).logits
    groups = bind_kernels(model.wina, input_groups(adapter_for("qwen2"), model.config.num_hidden_layers))
    assert groups == [] or all(not isinstance(g, QuantSharedInput) for g in groups)
    kinds = {id(g.kernel): g.kernel for g in model.wina.gates.values()}
    assert all(isinstance(k, QuantSharedInput) for k in kinds.values())
    assert sorted(len(k.gates) for k in kinds.values())[-2:] == [3, 3] or max(len(k.gates) for k in kinds.values()) >= 2
    for gate in model.wina.gates.values():
        gate.counting = False
    with torch.no_grad():
        got_prompt = model(ids).logits
        got_one = model(ids[:1, :1]).logits  # one sequence: gated
        dense_two = model(ids[:, :1]).logits  # two: dense (sparse_batch 1), as the float hook
        set_sparse_batch(model.wina, 2)
        got_step = model(ids[:, :1]).logits
    torch.testing.assert_close(got_one, want_step[:1], rtol=1e-4, atol=1e-4)
    if sparsity == 0:
        torch.testing.assert_close(dense_two, want_step, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(dense_two, want_step, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_prompt, want_prompt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_step, want_step, rtol=1e-4, atol=1e-4)
