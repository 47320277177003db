"""The decode-attention module on the CPU: its reference against torch's SDPA, and the "wina_sdpa"
attention implementation wired into a transformers model (the kernel itself: tests/test_attention_gpu.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wina_convert.runtime.kernels import attention, backend


def _sdpa(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("B,H,HKV,D,L", [(1, 8, 2, 16, 9), (2, 6, 6, 24, 33), (3, 4, 1, 8, 1)])
def test_reference_equals_sdpa(B, H, HKV, D, L, mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, s, D, generator=g) for n, s in ((H, 1), (HKV, L), (HKV, L)))
    mask = None
    if mask_kind != "none":
        keep = torch.rand(B, 1, 1, L, generator=g) > 0.3
        keep[..., 0] = True  # SDPA's result for a row with nothing to attend is NaN; the reference's is 0
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    scale = 0.37
    got = attention.reference_decode_attention(q, k, v, mask, scale)
    assert got.shape == (B, 1, H, D)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask, scale), rtol=1e-5, atol=1e-5)


def test_reference_with_nothing_to_attend_is_zero():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = attention.reference_decode_attention(q, k, v, torch.zeros(1, 1, 1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_cpu_is_not_supported_and_falls_back():
    q, k, v = torch.randn(1, 4, 1, 8, dtype=torch.bfloat16), torch.randn(1, 2, 5, 8, dtype=torch.bfloat16), torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert not attention.supported(q, k, v)
    torch.testing.assert_close(attention.decode_attention(q, k, v),
                               attention.reference_decode_attention(q, k, v), rtol=0, atol=0)


def test_kernel_takes_a_sliding_window_layer_only_with_its_mask(monkeypatch):
    """What the kernel is handed on top of ``supported`` (true here, as on a GPU): a sliding-window layer
    (Gemma 3, Mistral) with more keys than its window needs the mask that carries the window."""
    monkeypatch.setattr(attention, "supported", lambda *a, **k: True)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    window_mask = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    window_mask[..., 4:] = True
    assert attention.kernel_takes(q, k, v, window_mask, sliding_window=8)
    assert not attention.kernel_takes(q, k, v, None, sliding_window=8)
    assert attention.kernel_takes(q, k[:, :, :8], v[:, :, :8], None, sliding_window=8)  # every key inside it
    assert attention.kernel_takes(q, k, v, None, sliding_window=None)
    assert attention.kernel_takes(q, k, v, None, scaling=24 ** -0.5)  # Gemma's scale is passed through
    for extra in ({"softcap": 50.0}, {"output_attentions": True}, {"dropout": 0.1}):
        assert not attention.kernel_takes(q, k, v, window_mask, **extra), extra


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_wina_sdpa_in_a_model_gives_sdpa_results(family, tiny_models, request, monkeypatch):
    """A model switched to "wina_sdpa" (masks registered, prompts and unsupported steps through SDPA) gives
    the logits of the same model on SDPA, prefill and cached decode steps (Gemma 3: its scale, and decode
    steps past its sliding window of 8 positions)."""
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    path = request.getfixturevalue("tiny_gemma3") if family == "gemma3" else tiny_models[family]
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    monkeypatch.setattr(backend, "HAS_TRITON", True)  # enable() asks only for triton; CPU steps fall back
    assert attention.enable(ours)
    assert ours.config._attn_implementation == attention.IMPLEMENTATION
    seen = []
    original = attention.supported
    monkeypatch.setattr(attention, "supported", lambda *a, **k: seen.append(a[0].shape[2]) or original(*a, **k))
    ids = torch.randint(0, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    for cache_cls in (StaticCache, DynamicCache):
        outs = []
        for model in (base, ours):
            cache = StaticCache(config=model.config, max_cache_len=16) if cache_cls is StaticCache else DynamicCache()
            with torch.no_grad():
                rows = [model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True).logits[0]]
                for t in range(8, 12):
                    rows.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0])
            outs.append(torch.cat(rows))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert 1 in seen  # decode steps asked the kernel (and fell back on the CPU)


def test_enable_leaves_other_attention_alone(tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(backend, "HAS_TRITON", True)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="eager")
    assert not attention.enable(model)
    assert model.config._attn_implementation == "eager"
