"""No silent wrongness after a round trip, counters that count, models that share nothing (issue 18,
items 4, 5 and 6): ``save_pretrained`` of a loaded model, ``model.to(dtype)``, padded batches, two models
in one process. CPU here; the CUDA-graph and stream parts are in ``test_roundtrip_gpu.py``.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tree_hash
from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.checkpoint.format import verify_checkpoint
from wina_convert.errors import WinaError
from wina_convert.runtime.control import real_positions
from wina_convert.runtime.graphs import DecodeGraphs
from wina_convert.runtime.kernels.hook import bind_kernels, fuse_shortcuts, input_groups


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("roundtrip")
    return {
        "transformed": convert(tiny_models["qwen2"], root / "t", sparsity=0.5, transform=True, samples=4, seq_len=64,
                               quiet=True).output,
        "plain": convert(tiny_models["llama"], root / "p", sparsity=0.5, samples=4, seq_len=64, quiet=True).output,
    }


def _ids(n: int = 12, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- item 4: save_pretrained

@pytest.mark.parametrize("kind", ["transformed", "plain"])
def test_save_pretrained_writes_a_wina_checkpoint(checkpoints, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model = load(checkpoints[kind], sparsity=0.5, gate_prefill=True)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    verify_checkpoint(saved)  # complete: manifest, sidecar, index, every sha256
    if kind == "transformed":  # rotated weights: plain transformers must refuse them, not run them
        with pytest.raises((ValueError, KeyError), match="wina-convert"):
            AutoModelForCausalLM.from_pretrained(saved)
    again = load(saved, sparsity=0.5, gate_prefill=True)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)
    original = load_file(str(next(checkpoints[kind].glob("model-*.safetensors"))))
    written = {}
    for shard in saved.glob("model-*.safetensors"):
        written.update(load_file(str(shard)))
    assert set(written) == set(original)  # the same tensors (a tied head stays tied, shortcuts are kept)


def test_save_pretrained_of_packed_weights(checkpoints, tmp_path):
    """With the kernels bound, q/k/v, gate/up and the shortcuts are views of one packed W^T: all are saved."""
    model = load(checkpoints["transformed"], sparsity=0.5, gate_prefill=True)
    adapter = adapter_for("qwen2")
    bind_kernels(model.wina, input_groups(adapter, model.config.num_hidden_layers))
    fuse_shortcuts(model.model.layers, adapter)
    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved", sparsity=0.5, gate_prefill=True)
    for name, tensor in load(checkpoints["transformed"], sparsity=0.5, gate_prefill=True).state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_save_pretrained_follows_the_overwrite_rules(checkpoints, tmp_path):
    model = load(checkpoints["plain"], sparsity=0.5, gate_prefill=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = tree_hash(mine)
    with pytest.raises(WinaError, match="not a WINA checkpoint"):
        model.save_pretrained(mine)
    assert tree_hash(mine) == before
    with pytest.raises(WinaError, match="is the input"):
        model.save_pretrained(checkpoints["plain"])
    with pytest.raises(WinaError, match="safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    model.save_pretrained(tmp_path / "x")
    model.save_pretrained(tmp_path / "x")  # an earlier WINA checkpoint is replaced


# --------------------------------------------------------------------------- item 4: .to(dtype)

@pytest.mark.parametrize("kind", ["transformed", "plain"])
def test_to_bfloat16_equals_a_model_loaded_in_bfloat16(checkpoints, kind):
    model = load(checkpoints[kind], sparsity=0.5, gate_prefill=True).to(torch.bfloat16)
    fresh = load(checkpoints[kind], sparsity=0.5, dtype="bfloat16", gate_prefill=True)
    for gate in model.wina.gates.values():
        assert gate.thresholds.dtype == torch.float32 and gate.zeroed.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, fresh(_ids()).logits)
    assert model.wina.stats()["sparsity"] == pytest.approx(fresh.wina.stats()["sparsity"])


def _bound(path, dtype=None):
    model = load(path, sparsity=0.5, dtype=dtype, gate_prefill=True)
    adapter = adapter_for("qwen2")
    groups = bind_kernels(model.wina, input_groups(adapter, model.config.num_hidden_layers))
    fuse_shortcuts(model.model.layers, adapter)
    model.wina.set_counting(False)  # the kernel path
    return model, groups


def test_packed_weights_follow_to(checkpoints):
    """After ``.to(bfloat16)`` the kernels' packed W^T is repacked from the converted weights (the members
    are views of it again), the old float32 copy is freed, and decode equals a model bound in bfloat16."""
    model, groups = _bound(checkpoints["transformed"])
    old = weakref.ref(groups[0].weight_t)
    model.to(torch.bfloat16)
    fresh, _ = _bound(checkpoints["transformed"], "bfloat16")
    ids = _ids(6)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        got = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
        fresh_cache = fresh(input_ids=ids, use_cache=True).past_key_values
        want = fresh(input_ids=ids[:, -1:], past_key_values=fresh_cache, use_cache=True).logits
    assert torch.equal(got, want)
    qkv = groups[0]
    assert qkv.weight_t.dtype == torch.bfloat16 and not qkv.stale()
    for gate, (c0, c1) in zip(qkv.gates, qkv.columns):
        assert gate.weight.data_ptr() == qkv.weight_t[:, c0:c1].data_ptr()
    shortcut = model.model.layers[0].attn_shortcut
    c0, c1 = qkv.shortcut_columns
    assert shortcut.weight.data_ptr() == qkv.weight_t[:, c0:c1].data_ptr()
    gc.collect()
    assert old() is None, "the float32 packed copy is still referenced"


def test_decode_graphs_follow_to(checkpoints):
    """The decode runner notices a ``.to()`` before replaying (a recorded graph would read freed memory)."""
    model, groups = _bound(checkpoints["transformed"])
    runner = DecodeGraphs(model, model.wina.gates.values())
    epoch = model.wina.epoch
    model.to(torch.bfloat16)
    runner(input_ids=_ids(3))  # not eligible on CPU, but the weights are followed first
    assert not any(g.stale() for g in groups) and model.wina.epoch > epoch


# --------------------------------------------------------------------------- item 5: padding excluded

def test_padded_positions_are_not_counted(checkpoints):
    model = load(checkpoints["plain"], sparsity=0.5, gate_prefill=True)
    short, long_ = _ids(5, seed=1), _ids(11, seed=2)
    pad = torch.zeros(1, 6, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long_])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1), torch.ones_like(long_)])
    with torch.no_grad():
        model.wina.reset_stats()
        model(input_ids=batch, attention_mask=mask)
        together = {n: (g.zeroed.clone(), g.tokens) for n, g in model.wina.gates.items()}
        model.wina.reset_stats()
        model(input_ids=short)
        model(input_ids=long_)
        alone = {n: (g.zeroed.clone(), g.tokens) for n, g in model.wina.gates.items()}
    for name, (zeroed, tokens) in together.items():
        assert tokens == 16 == alone[name][1], name  # 5 + 11 real positions, not 22
    # the real positions are gated alike padded or not (up to float noise in attention): nearly equal counts
    total = sum(int(z.sum()) for z, _ in together.values())
    assert abs(total - sum(int(z.sum()) for z, _ in alone.values())) <= 0.002 * total


def test_padded_generate_counts_real_positions_only(checkpoints):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["plain"])
    tok.padding_side = "left"
    model = load(checkpoints["plain"], sparsity=0.5, gate_prefill=True)
    batch = tok(["The river", "A longer prompt about the weather in the mountains"], return_tensors="pt", padding=True)
    real = int(batch["attention_mask"].sum())
    model.wina.reset_stats()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    head = model.wina.head
    tokens = {g.tokens for n, g in model.wina.gates.items() if n != head}
    assert tokens == {real + 2 * 3}, (tokens, real)  # the prompts' real positions + 3 decode steps each
    if head is not None:  # the output head (gated by default) computes the last position only: 4 tokens a row
        assert model.wina.gates[head].tokens == 2 * 4


def test_real_positions_from_a_4d_mask():
    bool_mask = torch.tensor([[False, False, True, True], [True, True, True, True]]).reshape(2, 1, 1, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    four = (causal & bool_mask.reshape(2, 1, 1, 4)).reshape(2, 1, 4, 4)
    got = real_positions(four, torch.zeros(2, 4), torch.arange(4))
    assert got.tolist() == [[False, False, True, True], [True] * 4]
    additive = torch.where(four, 0.0, float("-inf"))
    assert torch.equal(real_positions(additive, torch.zeros(2, 4), torch.arange(4)), got)
    assert real_positions(None, torch.zeros(2, 4)) is None


# --------------------------------------------------------------------------- item 6: two models, pad id 0

def test_two_models_share_no_state(checkpoints):
    a = load(checkpoints["plain"], sparsity=0.5, gate_prefill=True)
    b = load(checkpoints["transformed"], sparsity=0.5, gate_prefill=True)
    runner = DecodeGraphs(a, a.wina.gates.values())
    epoch = a.wina.epoch
    b.wina.set_sparsity(0.3)  # drops b's decode graphs, not a's
    assert a.wina.epoch == epoch and runner.epoch == epoch
    a.wina.set_sparsity(0.4)
    assert runner.epoch > epoch
    with torch.no_grad():
        a.wina.reset_stats()
        b(_ids())
    assert a.wina.stats()["sparsity"] == 0.0 and b.wina.stats()["sparsity"] > 0


def test_save_pretrained_keeps_the_centers(tiny_models, tmp_path):
    """A --center checkpoint saved from a loaded model keeps its per-channel centers (the gates would
    otherwise gate |x| again): the reloaded model computes the same logits at the target."""
    src = convert(tiny_models["llama"], tmp_path / "c", sparsity=0.5, center="median", samples=4, seq_len=64,
                  quiet=True).output
    model = load(src, sparsity=0.5, gate_prefill=True)
    assert any(g.center is not None for g in model.wina.gates.values())
    model.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved", sparsity=0.5, gate_prefill=True)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
