"""The kernel hooks on CPU (where ``kernels.gated_linear`` computes with torch): packing, aliasing, fusion."""

from __future__ import annotations

import pytest
import torch

from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.runtime.graphs import DecodeGraphs, enable_decode_graphs, greedy
from wina_convert.runtime.kernels.hook import bind_kernels, force_kernels, fuse_shortcuts, input_groups


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("hook") / "qwen2"
    convert(tiny_models["qwen2"], out, sparsity=0.5, transform=True, quiet=True, samples=4, seq_len=64)  # q/k/v biases
    return out


def _bound(path, sparsity, shortcuts=True):
    model = load(path, sparsity=sparsity, gate_prefill=True)
    adapter = adapter_for("qwen2")
    groups = bind_kernels(model.wina, input_groups(adapter, model.config.num_hidden_layers))
    if shortcuts:
        assert fuse_shortcuts(model.model.layers, adapter) == model.config.num_hidden_layers
    return model, groups


def test_groups_and_aliasing(checkpoint):
    model, groups = _bound(checkpoint, 0.5, shortcuts=False)
    assert [len(g.gates) for g in groups[:4]] == [3, 1, 2, 1]  # q/k/v, o, gate/up, down
    qkv = groups[0]
    for gate, (c0, c1) in zip(qkv.gates, qkv.columns):  # the weights live once, in the packed W^T
        assert gate.weight.data_ptr() == qkv.weight_t[:, c0:c1].data_ptr()
        assert torch.equal(gate.weight, qkv.weight_t[:, c0:c1].t())
        assert gate.bias.data_ptr() == qkv.bias[c0:c1].data_ptr()
    ref = load(checkpoint, sparsity=0.5, gate_prefill=True)
    for name, gate in model.wina.gates.items():
        assert torch.equal(gate.weight, ref.wina.gates[name].weight)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_decode_through_hooks_equals_reference(checkpoint, sparsity):
    """Counting off selects the hooks (one fused call per group); the tokens equal the masking reference."""
    model, _ = _bound(checkpoint, sparsity)
    ref = load(checkpoint, sparsity=sparsity, gate_prefill=True)
    if sparsity == 0:
        force_kernels(model.wina)
        force_kernels(ref.wina)
    for gate in model.wina.gates.values():
        gate.counting = False
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    a = greedy(model, ids, 10)
    b = greedy(ref, ids, 10)
    assert torch.equal(a, b)


def test_shortcuts_join_the_launches(checkpoint):
    """Each layer's two shortcut rotations are packed after its q/k/v and gate/up (weights held once) and
    decode computes them there: the Shortcut modules never run, and the logits equal the unfused ones."""
    model, groups = _bound(checkpoint, 0.5)
    ref = load(checkpoint, sparsity=0.5, gate_prefill=True)
    layer, ref_layer = model.model.layers[0], ref.model.layers[0]
    attn, mlp = layer.fused
    assert attn is groups[0] and mlp is groups[2] and attn.splits[-1] == model.config.hidden_size
    c0, c1 = attn.shortcut_columns
    assert layer.attn_shortcut.weight.data_ptr() == attn.weight_t[:, c0:c1].data_ptr()
    assert torch.equal(layer.attn_shortcut.weight, ref_layer.attn_shortcut.weight)
    assert torch.equal(layer.mlp_shortcut.weight, ref_layer.mlp_shortcut.weight)
    for gate in model.wina.gates.values():
        gate.counting = False
    calls = []
    for m in model.modules():
        if type(m).__name__ == "Shortcut":
            m.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values  # prompt: the modules (6 positions)
        prompt_calls = len(calls)
        out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
        ref_cache = ref(input_ids=ids, use_cache=True).past_key_values
        want = ref(input_ids=ids[:, -1:], past_key_values=ref_cache, use_cache=True).logits
    assert prompt_calls == 2 * model.config.num_hidden_layers and len(calls) == prompt_calls  # decode: fused
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_shortcuts_stay_apart_when_the_norm_has_a_weight(checkpoint):
    model = load(checkpoint, sparsity=0.5, gate_prefill=True)
    adapter = adapter_for("qwen2")
    bind_kernels(model.wina, input_groups(adapter, model.config.num_hidden_layers))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
    assert fuse_shortcuts(model.model.layers, adapter) == model.config.num_hidden_layers - 1
    assert model.model.layers[1].fused is None and model.model.layers[0].fused is not None


def test_fast_mode_restores_and_cpu_has_no_graphs(checkpoint):
    model, _ = _bound(checkpoint, 0.5)
    assert enable_decode_graphs(model, model.wina.gates.values()) is None  # CPU: nothing installed
    runner = DecodeGraphs(model, model.wina.gates.values())
    before = [(g.counting, g.active) for g in model.wina.gates.values()]
    with runner.fast():
        assert all(not g.counting and g.active for g in model.wina.gates.values())
    assert [(g.counting, g.active) for g in model.wina.gates.values()] == before
    model.wina.set_sparsity(0.0)
    with runner.fast():  # dense stays dense
        assert not any(g.active for g in model.wina.gates.values())
    assert not runner.eligible({"input_ids": torch.zeros(1, 1, dtype=torch.long)})  # CPU tensors
    out = runner(input_ids=torch.zeros(1, 3, dtype=torch.long))  # not eligible: the model runs as it is
    assert out.logits.shape[:2] == (1, 3)


def test_argmax_last_matches_argmax_with_ties():
    from wina_convert.runtime.graphs import argmax_last

    g = torch.Generator().manual_seed(0)
    for vocab in (128256, 49152, 4099, 100):  # divisible near 1024, padded, small
        x = torch.randn(3, vocab, generator=g).bfloat16()
        hits = torch.randint(0, vocab, (2,), generator=g)
        x[1, hits] = 100.0  # a tie: the first index wins
        x[2, -1] = 100.0  # the last entry (in the padding's chunk)
        assert torch.equal(argmax_last(x), x.argmax(-1, keepdim=True)), vocab


def test_gated_linear_op_under_torch_compile():
    """The registered operator, as a compiled step calls it, equals the eager call."""
    from wina_convert.runtime.kernels import launch as kernels

    g = torch.Generator().manual_seed(2)
    wt, thr = torch.randn(64, 32, generator=g), torch.rand(1, 64, generator=g) * 0.5
    down, down_thr = torch.randn(32, 8, generator=g), torch.rand(2, 32, generator=g) * 0.1

    def step(x):
        y = kernels.gated_linear_op(x, wt, thr, [32], None)
        return kernels.gated_linear_op(torch.relu(y), down, down_thr, [5, 3], torch.ones(8))

    x = torch.randn(1, 64, generator=g)
    torch.testing.assert_close(torch.compile(step, backend="aot_eager")(x), step(x))


@pytest.mark.parametrize("rows", [1, 3])
def test_rms_scaled_matrices_on_the_torch_path(rows):
    """``gated_linear``'s rms arguments on CPU (the masking fallback): flagged matrices times rms(h)."""
    from wina_convert.runtime.kernels import launch as kernels

    g = torch.Generator().manual_seed(0)
    splits = [24, 8, 40]
    w = kernels.pack_weight([torch.randn(s, 40, generator=g) for s in splits])
    h = torch.randn(rows, 40, generator=g) * 3
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    thr = torch.rand(3, 40, generator=g)
    thr[2] = float("-inf")
    b = torch.randn(72, generator=g)
    norm = torch.linalg.vector_norm(h, dim=-1)
    y = kernels.gated_linear(x, w, thr, splits, b, norm, 0b100, 40, 1e-5)
    plain = kernels.gated_linear(x, w, thr, splits, b)
    torch.testing.assert_close(y[:, :32], plain[:, :32])  # unflagged: untouched
    torch.testing.assert_close(y[:, 32:], h @ w[:, 32:] + b[32:], rtol=1e-4, atol=1e-4)  # the un-normalized product
    ref = kernels.reference_gated_linear(x.double(), w.double(), thr, splits, b.double(), rms=(norm.double(), 0b100, 40, 1e-5))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_batched_decode_runs_dense_unless_allowed(checkpoint):
    """A decode step of more sequences than ``sparse_batch`` reads every weight (one dense product per group):
    its logits are the dense model's; with ``set_sparse_batch`` raised it is gated like the reference."""
    from wina_convert.runtime.kernels.hook import set_sparse_batch

    model, groups = _bound(checkpoint, 0.5)
    dense = load(checkpoint, sparsity=0.0, gate_prefill=True)
    gated = load(checkpoint, sparsity=0.5, gate_prefill=True)
    for gate in model.wina.gates.values():
        gate.counting = False
    ids = torch.randint(0, model.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want_dense = dense(input_ids=ids).logits
        want_gated = gated(input_ids=ids).logits
        assert not torch.allclose(want_dense, want_gated, atol=1e-3)  # the check below can tell them apart
        torch.testing.assert_close(got, want_dense, rtol=1e-4, atol=1e-4)
        set_sparse_batch(model.wina, 3)
        assert all(g.sparse_batch == 3 for g in groups)
        torch.testing.assert_close(model(input_ids=ids).logits, want_gated, rtol=1e-4, atol=1e-4)
        one = ids[:1]
        set_sparse_batch(model.wina, 1)  # batch 1 is always gated
        torch.testing.assert_close(model(input_ids=one).logits, gated(input_ids=one).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        set_sparse_batch(model.wina, 0)
