"""``convert --lowrank``: a rank-r term ``A (B ((1 - m) x))`` compensating each gate's dropped channels
(wina_convert/lowrank.py). Exact at sparsity 0, the factors paid for in bytes, fitted on calibration text,
stored in the sidecar, computed by the torch path and the kernel hooks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import heldout_ids as _ids
from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.errors import WinaError
from wina_convert.evaluate.inspect import describe
from wina_convert.evaluate.perplexity import evaluate
from wina_convert.lowrank import fit_factors, parse_ranks
from wina_convert.runtime.graphs import greedy
from wina_convert.runtime.kernels.hook import bind_kernels, input_groups

# a dense output head: the low-rank terms are the layers' (the in-budget head, the default, is test_head.py's)
CAL = dict(samples=4, seq_len=64, quiet=True, allocation="greedy", head_sparsity=0.0)
RANK = 8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def lowrank(tiny_models, tmp_path_factory):
    """family -> checkpoint with --lowrank at 0.5, and the same conversion without it ("-plain")."""
    root = tmp_path_factory.mktemp("lowrank")
    out = {}
    for family, kw in (("llama", {}), ("qwen2", {}), ("phi3", dict(transform=True))):  # qwen2: q/k/v biases; phi3: fused
        out[family] = convert(tiny_models[family], root / family, sparsity=0.5, lowrank=str(RANK), **CAL, **kw).output
    out["llama-plain"] = convert(tiny_models["llama"], root / "llama-plain", sparsity=0.5, **CAL).output
    return out


# --------------------------------------------------------------------------- exact at sparsity 0

@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_lowrank_is_exact_at_sparsity_0(family, lowrank, tiny_models):
    """Nothing dropped, nothing added: with every gate forced on at zero thresholds (so the term IS computed),
    the logits are the original model's."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    model = load(lowrank[family], sparsity=0, gate_prefill=True)
    gates = model.wina.gates.values()
    assert all(g.lowrank_a is not None for g in gates)
    ids = _ids(tiny_models[family])
    with torch.no_grad():
        want = original(ids).logits
        dense = model(ids).logits
        for gate in gates:
            gate.active = True  # thresholds 0: only exact zeros are dropped
        forced = model(ids).logits
    tolerance = 1e-6 if family != "phi3" else 1e-4  # phi3: transformed (rotations in float32)
    assert _rel(dense, want) <= tolerance
    assert _rel(forced, want) <= tolerance


# --------------------------------------------------------------------------- the term

def test_gate_adds_the_term_for_the_dropped_channels(lowrank):
    """By hand: y = W (m x) + A (B ((1 - m) x)) + b; the factors are the sidecar's; a fused gate too."""
    for family, name in (("qwen2", "model.layers.1.self_attn.q_proj"), ("phi3", "model.layers.1.self_attn.qkv_proj")):
        model = load(lowrank[family], sparsity=0.5, gate_prefill=True)
        gate = model.wina.gates[name]
        assert gate.active and gate.lowrank_a.shape == (gate.out_features, RANK)
        sidecar = load_file(str(lowrank[family] / "wina.safetensors"))
        assert torch.equal(sidecar[f"{name}.lowrank_a"], gate.lowrank_a)
        assert torch.equal(sidecar[f"{name}.lowrank_b"], gate.lowrank_b)
        x = torch.randn(5, gate.in_features)
        want, start = [], 0
        for p, size in enumerate(gate.splits):
            keep = x.abs() > gate.thresholds[p]
            w = gate.weight[start : start + size]
            y = (x * keep) @ w.T + (x * ~keep) @ gate.lowrank_b[p].T @ gate.lowrank_a[start : start + size].T
            want.append(y if gate.bias is None else y + gate.bias[start : start + size])
            start += size
        with torch.no_grad():
            assert torch.allclose(gate(x), torch.cat(want, dim=-1), atol=1e-5)


def test_fit_is_the_best_rank_r_map_on_the_dropped_inputs():
    """The whitened fit beats the plain truncated SVD of W (R-Sparse's) on anisotropic inputs, never loses to
    no compensation, and at full rank reproduces W on them."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    z = torch.randn(4000, 20, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, 20, dtype=torch.float64)
    moment = z.T @ z

    def error(m: torch.Tensor) -> float:
        return float(((z @ (w - m).T) ** 2).sum())

    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (2, 4):
        a, b = fit_factors(w, moment, rank)
        fitted = a.double() @ b.double()
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert error(fitted) < error(plain) < error(torch.zeros_like(w))
        root = torch.linalg.cholesky(moment + 1e-4 * float(moment.diagonal().mean()) * torch.eye(20, dtype=torch.float64))
        uu, ss, vv = torch.linalg.svd(w @ root, full_matrices=False)  # the minimizer written with a full SVD
        best = (uu[:, :rank] * ss[:rank]) @ vv[:rank] @ torch.linalg.inv(root)
        assert abs(error(fitted) - error(best)) <= 1e-6 * error(best)
        wide = fit_factors(w.T.contiguous(), z[:, :12].T @ z[:, :12], rank)  # out > in: the other Gram side
        assert wide[0].shape == (20, rank) and wide[1].shape == (rank, 12)
    a, b = fit_factors(w, moment, 12)
    assert error(a.double() @ b.double()) <= 1e-6 * error(torch.zeros_like(w))
    tall = w.T.contiguous()  # [20, 12] at full rank: W reproduced from the M^T M side too
    zt = z[:, :12]
    a, b = fit_factors(tall, zt.T @ zt, 12)
    assert float(((zt @ (tall - a.double() @ b.double()).T) ** 2).sum()) <= 1e-6 * float(((zt @ tall.T) ** 2).sum())
    a, b = fit_factors(w, torch.zeros(20, 20, dtype=torch.float64), 4)  # nothing dropped: no term
    assert not a.any() and not b.any()


def test_randomized_fit_of_large_matrices_is_near_the_best(monkeypatch):
    """Above ``EXACT_SIDE`` the top-r subspace comes from a seeded randomized iteration: on a matrix with a
    slowly decaying spectrum its error is within 0.1% of the exact fit's, and it is deterministic."""
    from wina_convert import lowrank as lr

    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g, dtype=torch.float64) * torch.linspace(1, 0.2, 300, dtype=torch.float64)
    z = torch.randn(3000, 300, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.3, 300, dtype=torch.float64)
    moment = z.T @ z

    def error(a, b) -> float:
        return float(((z @ (w - a.double() @ b.double()).T) ** 2).sum())

    exact = fit_factors(w, moment, 8)
    monkeypatch.setattr(lr, "EXACT_SIDE", 100)
    fast = fit_factors(w, moment, 8)
    assert error(*fast) <= error(*exact) * 1.001
    assert error(*exact) < 0.999 * float(((z @ w.T) ** 2).sum())
    again = fit_factors(w, moment, 8)
    assert torch.equal(fast[0], again[0]) and torch.equal(fast[1], again[1])


def test_compensation_lowers_the_error_of_the_sparse_model(lowrank):
    """At the same thresholds, the term brings the logits closer to dense (the factors were fitted for that)."""
    model = load(lowrank["llama"], sparsity=0.5, gate_prefill=True)
    ids = _ids(lowrank["llama"])
    with torch.no_grad():
        with_term = model(ids).logits
        factors = {n: (g.lowrank_a, g.lowrank_b) for n, g in model.wina.gates.items()}
        for gate in model.wina.gates.values():
            gate.set_lowrank(None, None)
        without = model(ids).logits
        model.wina.set_sparsity(0)
        dense = model(ids).logits
    assert _rel(with_term, dense) < 0.9 * _rel(without, dense)
    assert all(a is not None for a, _ in factors.values())


# --------------------------------------------------------------------------- bytes

def test_factors_are_paid_for_in_bytes(lowrank):
    """The factors' r (in + out) numbers per matrix are extra bytes: the matrices skip more, and on held-out
    text the bytes read (kept columns + factors) are still 1 - target; at sparsity 0 no factor is read."""
    control = load(lowrank["llama"], sparsity=0.5, gate_prefill=True).wina
    plain = load(lowrank["llama-plain"], sparsity=0.5, gate_prefill=True).wina
    names = control.layers[0]
    gated = sum(control.gates[n].weight.numel() for n in names)
    factors = sum(RANK * (control.gates[n].in_features + control.gates[n].out_features) for n in names)
    assert control.budget.extra[0] == pytest.approx(factors / gated)
    assert list(plain.budget.extra) == [0.0] * len(plain.layers)
    result = evaluate(lowrank["llama"], sparsity=0.5, max_tokens=2048, seq_len=128)
    base = evaluate(lowrank["llama-plain"], sparsity=0.5, max_tokens=2048, seq_len=128)
    assert result["kept_bytes_fraction"] == pytest.approx(0.5, abs=0.06)
    assert result["sparsity"] > base["sparsity"] + 0.5 * control.budget.extra[0]  # columns skipped to pay
    info = describe(lowrank["llama"])
    assert info["kept_bytes_fraction"] == pytest.approx(0.5, abs=1e-3)
    assert result["bytes_per_token"] == pytest.approx(info["bytes_per_token"], rel=0.1)
    dense = evaluate(lowrank["llama"], sparsity=0.0, max_tokens=256, seq_len=128)
    assert dense["kept_bytes_fraction"] == pytest.approx(1.0)
    model = load(lowrank["llama"], sparsity=0.5, gate_prefill=True)  # factors dropped at run time: no longer read, not counted
    for gate in model.wina.gates.values():
        gate.set_lowrank(None, None)
    stripped = evaluate(model, sparsity=0.5, max_tokens=2048, seq_len=128)
    assert stripped["kept_bytes_fraction"] < result["kept_bytes_fraction"] - 0.5 * control.budget.extra[0]


# --------------------------------------------------------------------------- recorded, saved, loaded

def test_lowrank_is_recorded_and_survives_save_and_load(lowrank, tmp_path, capsys):
    from wina_convert.cli import main

    wina = json.loads((lowrank["llama"] / "config.json").read_text())["wina"]
    assert set(wina["lowrank"].values()) == {RANK} and len(wina["lowrank"]) == 7
    assert wina["calibration"]["lowrank"] == wina["lowrank"]
    assert "down_proj=8" in describe(lowrank["llama"])["lowrank"]
    assert describe(lowrank["llama-plain"])["lowrank"] == "none"
    capsys.readouterr()
    assert main(["inspect", str(lowrank["llama"])]) == 0
    assert "mlp.down_proj=8" in capsys.readouterr().out.replace("\n", "")
    model = load(lowrank["llama"], sparsity=0.5, gate_prefill=True)
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again", sparsity=0.5, gate_prefill=True)
    ids = _ids(lowrank["llama"], 48)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    for name, gate in model.wina.gates.items():
        assert torch.equal(gate.lowrank_b, again.wina.gates[name].lowrank_b)


def test_per_role_ranks(tiny_models, tmp_path):
    linears = adapter_for("llama").gated_linears()
    ranks = parse_ranks("down=6,qkv=2", linears)
    assert {n.rsplit(".", 1)[-1]: r for n, r in ranks.items()} == {
        "q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 0, "gate_proj": 0, "up_proj": 0, "down_proj": 6}
    assert set(parse_ranks("0", linears).values()) == {0} and set(parse_ranks(None, linears).values()) == {0}
    out = convert(tiny_models["llama"], tmp_path / "roles", sparsity=0.5, lowrank="down_proj=6", **CAL).output
    gates = load(out, sparsity=0.5, gate_prefill=True).wina.gates
    assert gates["model.layers.0.mlp.down_proj"].lowrank_a.shape[1] == 6
    assert all(g.lowrank_a is None for n, g in gates.items() if not n.endswith("down_proj"))


def test_bad_lowrank_options_are_refused(tiny_models, tmp_path):
    import subprocess
    import sys

    for spec, message in (("fast", "takes a rank"), ("-3", ">= 0"), ("attn=4", "unknown role"), ("100", "smaller side")):
        with pytest.raises(WinaError, match=message):
            convert(tiny_models["llama"], tmp_path / "a", lowrank=spec, **CAL)
    with pytest.raises(WinaError, match="--no-calibrate"):
        convert(tiny_models["llama"], tmp_path / "b", lowrank="4", calibrate=False, quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    proc = subprocess.run([sys.executable, "-m", "wina_convert", "convert", str(tiny_models["llama"]), "-o",
                           str(tmp_path / "c"), "--lowrank", "down=x", "-q"], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "takes a rank" in lines[0], proc.stderr


# --------------------------------------------------------------------------- kernel hooks (CPU)

def _decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the last token of ``ids`` as a one-token decode step after the prompt before it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        return model(ids[:, -1:], past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_kernel_hooks_add_the_term(family, lowrank, monkeypatch):
    """A decode step through the kernel hooks (one fused call per group; on CPU they compute with torch)
    adds the term inside the group's launch (the packed factors go to ``gated_linear``; no torch ops on
    top): its logits and greedy tokens equal the masking reference's, and differ without it."""
    from wina_convert.runtime.kernels import hook, launch

    model = load(lowrank[family], sparsity=0.5, gate_prefill=True)
    ref = load(lowrank[family], sparsity=0.5, gate_prefill=True)
    groups = bind_kernels(model.wina, input_groups(adapter_for(family), model.config.num_hidden_layers))
    assert all(g.lr_b is not None for g in groups)
    for group in groups:  # the members' factors are views of the packed ones: held once
        for gate in group.gates:
            assert gate.lowrank_a.untyped_storage().data_ptr() == group.lr_a.untyped_storage().data_ptr()
            assert gate.lowrank_b.untyped_storage().data_ptr() == group.lr_b.untyped_storage().data_ptr()
    for gate in model.wina.gates.values():
        gate.counting = False
    masks, added = [], []
    original = launch.gated_linear_op
    monkeypatch.setattr(launch, "gated_linear_op", lambda *a, **k: masks.append(a[12] if len(a) > 12 else 0) or original(*a, **k))
    separate = hook.compensated
    monkeypatch.setattr(hook, "compensated", lambda *a: added.append(1) or separate(*a))
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    fast = _decode_logits(model, ids)
    assert masks and all(masks) and not added  # every launch carried the term
    assert _rel(fast, _decode_logits(ref, ids)) <= 1e-5
    assert torch.equal(greedy(model, ids, 10), greedy(ref, ids, 10))
    for gate in ref.wina.gates.values():
        gate.set_lowrank(None, None)
    assert _rel(fast, _decode_logits(ref, ids)) > 1e-3


def test_kernel_hooks_with_mixed_ranks_add_the_term_apart(lowrank, monkeypatch):
    """A group whose members do not share one rank (here k_proj's factors removed, in both models) keeps
    the kernel for the weights and adds each term with torch ops; the others stay packed."""
    from wina_convert.runtime.kernels import hook

    model = load(lowrank["qwen2"], sparsity=0.5, gate_prefill=True)
    ref = load(lowrank["qwen2"], sparsity=0.5, gate_prefill=True)
    groups = bind_kernels(model.wina, input_groups(adapter_for("qwen2"), model.config.num_hidden_layers))
    for m in (model, ref):
        m.wina.gates["model.layers.0.self_attn.k_proj"].set_lowrank(None, None)
    for gate in model.wina.gates.values():
        gate.counting = False
    added = []
    separate = hook.compensated
    monkeypatch.setattr(hook, "compensated", lambda *a: added.append(1) or separate(*a))
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    fast = _decode_logits(model, ids)
    assert _rel(fast, _decode_logits(ref, ids)) <= 1e-5
    assert len(added) == 3  # q, k, v of layer 0, one call each
    assert sum(g.lr_b is None for g in groups) == 1
