"""Issue 18 on CUDA (items 4, 5, 6): decode steps replayed from CUDA graphs are counted, ``.to(dtype)``
keeps the packed kernel weights and the graphs consistent, and the split-K workspace is per stream.

Run on the device machine: ``pytest -m gpu tests/test_roundtrip_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import gated_head
from wina_convert.runtime.kernels import backend

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and backend.triton_available("cuda")), reason="needs CUDA and triton"
)
DEV = "cuda"


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    from wina_convert import convert

    root = tmp_path_factory.mktemp("gpu-roundtrip")
    return {transform: convert(tiny_models["llama"], root / str(transform), sparsity=0.5, transform=transform,
                               quiet=True, samples=4, seq_len=64).output for transform in (False, True)}


def _prompt(model, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(DEV)


@needs_gpu
@pytest.mark.parametrize("transform", [False, True])
def test_graph_replayed_decode_steps_are_counted(converted, transform):
    from wina_convert import load

    fast = load(converted[transform], sparsity=0.5, device=DEV, gate_prefill=True)
    ref = load(converted[transform], sparsity=0.5, device=DEV, kernels=False, gate_prefill=True)
    ids = _prompt(fast)
    new = 12
    for model in (fast, ref):
        model.wina.reset_stats()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static")
    assert fast.wina_decode.replays >= new - 3, "the decode steps ran as graph replays"
    want = ids.shape[1] + new - 1  # the prompt, then one position per decode step but the last token's
    # a gated output head (the default, inside the budget) reads only the position whose next token is asked
    # for (generate keeps one logit row): the prompt's last, then one per decode step
    head = gated_head(converted[transform])
    for model in (ref, fast):
        tokens = {name: g.tokens for name, g in model.wina.gates.items()}
        assert {t for name, t in tokens.items() if name != head} == {want}
        assert head is None or tokens[head] == new, (head, tokens.get(head))
    assert fast.wina.stats()["sparsity"] == pytest.approx(ref.wina.stats()["sparsity"], abs=0.02)

    fast.wina.set_counting(False)  # what the speed benchmarks do: no counting in the graph
    fast.wina.reset_stats()
    with torch.no_grad():
        fast.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert {g.tokens for g in fast.wina.gates.values()} == {0}


@needs_gpu
def test_to_bfloat16_after_graphs_equals_a_bfloat16_model(converted):
    from wina_convert import load

    model = load(converted[True], sparsity=0.5, device=DEV, gate_prefill=True)
    ids = _prompt(model, seed=1)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kw)  # graphs recorded on the float32 weights
        group = next(iter(model.wina.gates.values())).kernel
        old = group.weight_t.data_ptr()
        model.to(torch.bfloat16)
        got = model.generate(ids, **kw)
        fresh = load(converted[True], sparsity=0.5, device=DEV, dtype="bfloat16", gate_prefill=True)
        want = fresh.generate(ids, **kw)
    assert group.weight_t.dtype == torch.bfloat16 and group.weight_t.data_ptr() != old and not group.stale()
    assert torch.equal(got, want)


@needs_gpu
def test_workspace_is_per_stream():
    from wina_convert.runtime.kernels import launch

    device = torch.device(DEV)
    launch.reserve_workspace(device, 4096)
    main = launch._workspace(device, 1024, 8)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = launch._workspace(device, 1024, 8)
        again = launch._workspace(device, 1024, 8)
    assert other[0].data_ptr() != main[0].data_ptr() and again[0].data_ptr() == other[0].data_ptr()
    assert other[0].numel() >= 4096, "a new stream's workspace is as wide as the widest bound model needs"
    assert launch._workspace(device, 1024, 8)[0].data_ptr() == main[0].data_ptr()


@needs_gpu
def test_two_models_decode_on_two_streams(converted):
    """Two models decoding at once on two streams: each gets the tokens it gets alone."""
    from wina_convert import load

    a = load(converted[False], sparsity=0.5, device=DEV, gate_prefill=True)
    b = load(converted[True], sparsity=0.5, device=DEV, gate_prefill=True)
    ids = _prompt(a, seed=2)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        alone = (a.generate(ids, **kw), b.generate(ids, **kw))
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        s1.wait_stream(torch.cuda.current_stream())
        s2.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            ga = a.generate(ids, **kw)
        with torch.cuda.stream(s2):
            gb = b.generate(ids, **kw)
        torch.cuda.synchronize()
    assert torch.equal(ga, alone[0]) and torch.equal(gb, alone[1])
