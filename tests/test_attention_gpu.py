"""The triton decode-attention kernel against the float32 reference, and in whole models (needs CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from wina_convert.runtime.kernels import attention
from wina_convert.runtime.kernels import backend

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and backend.triton_available("cuda")), reason="needs CUDA and triton"
)
DEV = "cuda"


def _inputs(B, H, HKV, D, L, mask_kind, dtype, seed=0, filled=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, 1, D, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, HKV, L, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, HKV, L, D, device=DEV, generator=g).to(dtype)
    mask = None
    if mask_kind != "none":
        keep = torch.rand(B, 1, 1, L, device=DEV, generator=g) > 0.2
        if filled is not None:  # a static cache filled up to `filled`: causal mask over the filled part only
            keep = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=DEV)
            keep[..., :filled] = True
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, device=DEV, dtype=dtype).masked_fill(~keep, float("-inf"))
    return q, k, v, mask


def _check(q, k, v, mask, out, scale=None):
    ref = attention.reference_decode_attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    assert not torch.isnan(out).any(), "unwritten (NaN) outputs"
    rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    assert rel <= 1e-2, rel


# (B, H, HKV, D, L): Llama-3-8B (GQA 4), SmolLM2 (GQA 3, D 64), Phi-3 (D 96, MHA), Qwen3-ish, MQA, odd lengths
SHAPES = [(1, 32, 8, 128, 161), (1, 32, 8, 128, 4096), (1, 9, 3, 64, 300), (1, 32, 32, 96, 77), (2, 16, 8, 128, 1),
          (3, 8, 1, 64, 1000), (1, 64, 2, 128, 513)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, mask_kind, dtype):
    q, k, v, mask = _inputs(*shape, mask_kind, dtype)
    assert attention.supported(q, k, v, mask)
    B, H, _, D = q.shape
    out = torch.full((B, 1, H, D), float("nan"), device=DEV, dtype=dtype)
    attention._launch(q, k, v, mask, 1 / math.sqrt(D), out)
    _check(q, k, v, mask, out)


@needs_gpu
@pytest.mark.parametrize("L", [1, 300, 512, 2000])
def test_kernel_with_gemma3_scale_and_heads(L):
    """Gemma-3-270M's heads (4 query heads on 1 K/V head of dim 256) with its scale
    ``query_pre_attn_scalar ** -0.5`` taken as given, and a sliding-window mask (the last 512 positions)."""
    q, k, v, _ = _inputs(1, 4, 1, 256, L, "none", torch.bfloat16, seed=5)
    keep = torch.zeros(1, 1, 1, L, dtype=torch.bool, device=DEV)
    keep[..., max(0, L - 512):] = True
    for scale in (256 ** -0.5, 24 ** -0.5):
        for mask in (None, keep):
            assert attention.kernel_takes(q, k, v, mask, scaling=scale, sliding_window=512) == (mask is not None or L <= 512)
            out = attention.decode_attention(q, k, v, mask, scale)
            _check(q, k, v, mask, out, scale)


@needs_gpu
@pytest.mark.parametrize("target", [1, 8, 132, 100000])
def test_split_counts_and_repeats(target, monkeypatch):
    """Unsplit, a few splits, one block a program: the same result, and again (the tickets reset)."""
    monkeypatch.setattr(attention, "TARGET_PROGRAMS", target)
    q, k, v, mask = _inputs(1, 32, 8, 128, 700, "bool", torch.bfloat16, seed=1)
    first = attention.decode_attention(q, k, v, mask)
    _check(q, k, v, mask, first)
    for _ in range(3):
        assert torch.equal(attention.decode_attention(q, k, v, mask), first)


@needs_gpu
def test_static_cache_reads_only_the_filled_part():
    """Masked-off positions of the cache never count, whatever they hold (NaN here)."""
    q, k, v, mask = _inputs(1, 32, 8, 128, 1024, "bool", torch.bfloat16, seed=2, filled=37)
    k[:, :, 37:] = float("nan")
    v[:, :, 37:] = float("nan")
    out = attention.decode_attention(q, k, v, mask)
    _check(q, k[:, :, :37], v[:, :, :37], mask[..., :37], out)


@needs_gpu
def test_nothing_to_attend_gives_zeros():
    q, k, v, _ = _inputs(2, 8, 2, 64, 50, "none", torch.float16, seed=3)
    mask = torch.zeros(2, 1, 1, 50, dtype=torch.bool, device=DEV)
    mask[1, ..., :10] = True
    out = attention.decode_attention(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    _check(q[1:], k[1:], v[1:], mask[1:], out[1:])


@needs_gpu
def test_cuda_graph_capture():
    q, k, v, mask = _inputs(1, 32, 8, 128, 300, "bool", torch.bfloat16, seed=4)
    eager = attention.decode_attention(q, k, v, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.decode_attention(q, k, v, mask)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    _check(q, k, v, mask, out)
    assert not torch.equal(out, eager)


@needs_gpu
def test_unsupported_inputs_fall_back():
    q, k, v, mask = _inputs(1, 8, 2, 64, 20, "bool", torch.bfloat16)
    assert not attention.supported(q.float(), k.float(), v.float(), mask)  # float32: SDPA keeps it
    assert not attention.supported(q.expand(1, 8, 2, 64), k, v, mask)  # two query positions
    assert not attention.supported(q, k, v, mask.expand(1, 8, 1, 20))  # a mask per head
    out = attention.decode_attention(q.float(), k.float(), v.float(), mask)
    _check(q.float(), k.float(), v.float(), mask, out)


@pytest.fixture(scope="module")
def bf16_models(tiny_models, tiny_gemma3, tiny_tokenizer_dir, tmp_path_factory):
    """family -> a tiny model converted at 0.5 in bf16 (Mistral with a sliding window of 8 positions; Gemma 3
    with two sliding-window layers of 8 and its own attention scale)."""
    from tests.helpers import build_tiny

    from wina_convert import convert

    root = tmp_path_factory.mktemp("attn-gpu")
    out = {}
    for family in ("llama", "mistral", "qwen3", "phi3", "gemma3"):
        source = tiny_gemma3 if family == "gemma3" else tiny_models[family]
        if family == "mistral":
            source = build_tiny("mistral", root / "mistral-sw8", tiny_tokenizer_dir, sliding_window=8)
        out[family] = root / f"{family}-bf16"
        convert(source, out[family], sparsity=0.5, transform=False, dtype="bfloat16", quiet=True, samples=4, seq_len=64)
    return out


@needs_gpu
@pytest.mark.parametrize("family,compiled", [("llama", False), ("llama", True), ("mistral", False), ("qwen3", False),
                                             ("phi3", False), ("gemma3", False)])
def test_model_decode_uses_the_kernel_and_matches_sdpa(bf16_models, family, compiled):
    """load() switches a model to "wina_sdpa": the decode steps run the kernel (in the graphs, under compile
    too), and the logits match the same model on transformers' SDPA (Mistral: a sliding-window mask; Gemma 3:
    sliding-window layers, whose static cache layers are not graph-recorded, decode eagerly)."""
    from transformers import StaticCache

    from wina_convert import load

    fast = load(bf16_models[family], sparsity=0.5, device=DEV, gate_prefill=True)
    sdpa = load(bf16_models[family], sparsity=0.5, device=DEV, gate_prefill=True)
    sdpa.set_attn_implementation("sdpa")
    assert fast.config._attn_implementation == attention.IMPLEMENTATION
    calls = []
    original = attention.decode_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return original(*args, **kw)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fast.config.vocab_size, (1, 30), generator=g).to(DEV)
    steps = 12
    logits = []
    for model in (fast, sdpa):
        model.wina_decode.compile = compiled
        model.wina_decode.reset()
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
        attention.decode_attention = spy
        try:
            with torch.no_grad():
                model(input_ids=ids[:, :-steps], past_key_values=cache, use_cache=True)
                rows = []
                for t in range(ids.shape[1] - steps, ids.shape[1]):
                    out = model.wina_decode(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    rows.append(out.logits[:, -1].float())
        finally:
            attention.decode_attention = original
        assert not model.wina_decode.failures, model.wina_decode.failures
        logits.append(torch.cat(rows))
    rel = float((logits[0] - logits[1]).norm() / logits[1].norm())
    assert rel <= 1e-2, rel
    assert calls, "the decode kernel never ran"
    assert all(shape[2] == 1 for shape in calls)
