"""``convert --weights int4|int8``: quantized gated matrices, exact at sparsity 0 against the dequantized model,
their bytes counted as stored, a GGUF's Q4_0 / Q4_1 / Q8_0 values kept, and the bad inputs refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import FAMILIES, assert_one_line_error, heldout_ids, original_model, relative_error, run
from wina_convert import convert, load
from wina_convert.arch import adapter_for
from wina_convert.checkpoint.format import INDEX, write_manifest
from wina_convert.errors import WinaError
from wina_convert.quant import QuantizedWeight, quantize_rtn, unpack_int4

GROUP = 16  # divides every tiny matrix's outputs (64, 160, 32, 128, and the fused phi3 ones)
CHEAP = dict(samples=2, seq_len=64, allocation="greedy", head_sparsity=0, quiet=True)


def stored(directory: Path, module: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors whose names start with ``module.`` (read straight from the shards)."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    out = {}
    for name, shard in weight_map.items():
        if name.startswith(module + "."):
            with safe_open(str(directory / shard), framework="pt") as f:
                out[name] = f.get_tensor(name)
    return out


def dequantized_reference(source: Path, bits: int, group: int):
    """The original model with every gated matrix replaced by its round-to-nearest quantization, dequantized
    element by element here (``w = s q + m`` from the codes, not through ``QuantizedWeight.dequantize``)."""
    model = original_model(source)
    adapter = adapter_for(model.config.model_type)
    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            for name in adapter.gated_linears():
                linear = model.get_submodule(adapter.layer_key(layer, name))
                q = quantize_rtn(linear.weight, bits, group)
                codes = (unpack_int4(q.qweight) if bits == 4 else q.qweight.to(torch.int16)).float()  # [in, out]
                if bits == 4 and q.offsets is None:
                    codes = codes - 8
                s = q.scales.float().repeat_interleave(group, dim=1)
                w = s * codes + (0 if q.offsets is None else q.offsets.float().repeat_interleave(group, dim=1))
                linear.weight.copy_(w.t())
    return model


class Quantized(dict):
    """(family, bits) -> (source, checkpoint): a calibrated checkpoint with int4 / int8 gated matrices (groups of 16
    outputs), converted the first time a test asks for it."""

    def __init__(self, sources: dict[str, Path], root: Path):
        super().__init__()
        self.sources, self.root = sources, root

    def __missing__(self, key: tuple[str, int]) -> tuple[Path, Path]:
        family, bits = key
        source = self.sources[family]
        self[key] = (source, convert(source, self.root / f"{family}-{bits}", sparsity=0.5, weights=f"int{bits}",
                                     group_size=GROUP, **CHEAP).output)
        return self[key]


@pytest.fixture(scope="module")
def quantized(tiny_models, tiny_gemma3, tmp_path_factory) -> Quantized:
    return Quantized({**tiny_models, "gemma3_text": tiny_gemma3}, tmp_path_factory.mktemp("quantized"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", [*FAMILIES, "gemma3_text"])
def test_sparsity0_equals_the_dequantized_model(quantized, family, bits):
    source, checkpoint = quantized[family, bits]
    reference = dequantized_reference(source, bits, GROUP)
    model = load(checkpoint, sparsity=0, gate_prefill=True)
    ids = heldout_ids(source)
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert relative_error(want, got) < 1e-5
    # and it is not the float model: quantization changed the logits
    with torch.no_grad():
        assert relative_error(original_model(source)(ids).logits, got) > 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_stores_codes_scales_offsets_not_floats(quantized, bits):
    source, checkpoint = quantized["llama", bits]
    wina = json.loads((checkpoint / "config.json").read_text())["wina"]
    assert wina["format_version"] == 2 and wina["weights"]["scheme"] == f"int{bits}" and wina["weights"]["group_size"] == GROUP
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "wina-convert"  # plain transformers refuses it
    module = "model.layers.1.mlp.down_proj"
    tensors = stored(checkpoint, module)
    assert f"{module}.weight" not in tensors
    weight = original_model(source).get_submodule(module).weight
    want = quantize_rtn(weight, bits, GROUP)
    q = QuantizedWeight.from_tensors(module, tensors)
    assert torch.equal(q.qweight, want.qweight) and torch.equal(q.scales, want.scales)
    assert (q.offsets is None) == (bits == 8)
    # the runtime's module carries it (the kernels' contract) and computes with its dequantization
    gate = load(checkpoint, sparsity=0, gate_prefill=True).wina.gates[module]
    assert gate.quant is not None and torch.equal(gate.quant.qweight, want.qweight)
    assert torch.equal(gate.weight.detach(), want.dequantize(gate.weight.dtype))


def test_bytes_are_counted_as_stored(quantized):
    """The gated bytes the budget counts are the codes plus the float16 scales (and offsets), counted here from
    the shapes: int4 ``out in / 2 + 2 * 2 out in / G``, int8 ``out in + 2 out in / G``."""
    for bits in (4, 8):
        _, checkpoint = quantized["llama", bits]
        model = load(checkpoint, sparsity=0.5, gate_prefill=True)
        ctl = model.wina
        adapter = adapter_for("llama")
        for layer, names in enumerate(ctl.layers):
            count = 0
            for name in names:
                out, inp = ctl.gates[name].out_features, ctl.gates[name].in_features
                count += out * inp // 2 + 4 * out * inp // GROUP if bits == 4 else out * inp + 2 * out * inp // GROUP
            assert ctl.gated_bytes[layer] == count
        ids = heldout_ids(quantized["llama", bits][0])
        ctl.set_gate_prefill(True)  # one forward over every position, each gated and counted
        ctl.reset_stats()
        with torch.no_grad():
            model(ids)
        stats = ctl.stats()
        # each gate's kept inputs times its bytes per input row, counted from the zeroed counters
        kept = 0.0
        for name in (n for names in ctl.layers for n in names):
            g = ctl.gates[name]
            row = g.quant.nbytes / g.in_features
            kept += sum((g.tokens * g.in_features - z) / g.tokens * row * size / g.out_features
                        for z, size in zip(g.zeroed.tolist(), g.splits))
        assert stats["gated_bytes_per_token"] == pytest.approx(kept, rel=1e-9)
        assert 1 - stats["kept_bytes_fraction"] == pytest.approx(0.5, abs=0.1)
        del adapter


def test_save_pretrained_keeps_the_codes(quantized, tmp_path):
    _, checkpoint = quantized["qwen2", 4]
    model = load(checkpoint, sparsity=0, gate_prefill=True)
    model.save_pretrained(tmp_path / "again")
    module = "model.layers.0.self_attn.k_proj"
    assert torch.equal(stored(checkpoint, module)[f"{module}.qweight"], stored(tmp_path / "again", module)[f"{module}.qweight"])
    again = load(tmp_path / "again", sparsity=0, gate_prefill=True)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_bad_group_size_and_scheme_are_refused_in_one_line(tiny_models, tmp_path, capsys):
    code, _, err = run(capsys, "convert", tiny_models["llama"], "-o", tmp_path / "a", "--weights", "int4",
                       "--group-size", "48", "--no-calibrate")
    assert_one_line_error(code, err, "--group-size 48 does not divide")
    assert not (tmp_path / "a").exists()
    code, _, err = run(capsys, "convert", tiny_models["llama"], "-o", tmp_path / "b", "--weights", "int3", "--no-calibrate")
    assert_one_line_error(code, err, "unknown --weights 'int3'")
    code, _, err = run(capsys, "convert", tiny_models["llama"], "-o", tmp_path / "c", "--group-size", "32", "--no-calibrate")
    assert_one_line_error(code, err, "--group-size is for quantized weights")


def test_a_scheme_the_loader_does_not_know_is_refused_in_one_line(quantized, tmp_path, capsys):
    _, checkpoint = quantized["llama", 4]
    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    config["wina"]["weights"]["scheme"] = "nf4"
    (edited / "config.json").write_text(json.dumps(config))
    write_manifest(edited)
    with pytest.raises(WinaError, match="weights are 'nf4', which this wina-convert cannot read"):
        load(edited, gate_prefill=True)
    code, _, err = run(capsys, "eval", edited, "--sparsity", "0")
    assert_one_line_error(code, err, "nf4")


@pytest.mark.slow
def test_smollm2_q4_1_gguf_keeps_its_values(smollm2_gguf, smollm2_hf, tmp_path):
    """SmolLM2's GGUF (gated tensors Q4_1) with --weights int4: the codes are the file's, re-laid out, and at
    sparsity 0 the checkpoint gives the float model's logits (transformers' dequantization of the same file)."""
    out = convert(smollm2_gguf, tmp_path / "q", weights="int4", calibrate=False, quiet=True).output
    wina = json.loads((out / "config.json").read_text())["wina"]
    assert wina["weights"]["source"] == "gguf" and wina["weights"]["scheme"] == "int4"
    q = QuantizedWeight.from_tensors("model.layers.0.self_attn.q_proj", stored(out, "model.layers.0.self_attn.q_proj"))
    assert (q.group_in, q.group_out, q.bits) == (32, 1, 4) and q.offsets is not None
    original = original_model(smollm2_hf)
    model = load(out, sparsity=0, gate_prefill=True)
    ids = heldout_ids(smollm2_hf)
    with torch.no_grad():
        assert relative_error(original(ids).logits, model(ids).logits) < 1e-5
    layers = model.get_submodule("model.layers")
    assert layers[0].mlp.down_proj.quant.nbytes < original.model.layers[0].mlp.down_proj.weight.numel() * 4 / 6


@pytest.mark.slow
def test_a_gguf_we_cannot_keep_exactly_is_refused_in_one_line(smollm2_gguf, tmp_path, capsys):
    """Qwen's Q4_K_M GGUF (Q5_0 / Q4_K / Q6_K layers) with --weights: refused before it is read whole; SmolLM2's
    Q4_1 into int8 is kept exactly, never into a narrower type."""
    qwen = Path(smollm2_gguf).parent.parent / "qwen2.5-0.5b"
    ggufs = sorted(qwen.glob("*.gguf"))
    if not ggufs:
        pytest.skip("the Qwen GGUF is not cached (scripts/fetch_models.py qwen2.5-0.5b)")
    code, _, err = run(capsys, "convert", ggufs[0], "-o", tmp_path / "q", "--weights", "int4")
    assert_one_line_error(code, err, "keeps only Q4_0, Q4_1, Q8_0 values exactly")
    assert not (tmp_path / "q").exists()
    code, _, err = run(capsys, "convert", smollm2_gguf, "-o", tmp_path / "t", "--weights", "int4", "--transform", "--no-calibrate")
    assert_one_line_error(code, err, "--transform rotates the weights")


def compressed_tensors_model(source: Path, directory: Path, bits: int, symmetric: bool, group: int = 16):
    """``source`` quantized and written by the compressed-tensors library itself (pack-quantized, weight-only int
    groups of ``group`` inputs, lm_head left out, as llm-compressor writes it); returns the library's own
    decompression of it (a float model) for reference."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.reshape(module.weight.shape[0], -1, group)
                scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
                module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    shutil.copy(source / "tokenizer.json", directory / "tokenizer.json")
    shutil.copy(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    compressor.decompress_model(model)
    return model.eval()


@pytest.mark.parametrize("bits,symmetric,weights", [(4, True, "int4"), (4, False, "int4"), (8, True, "int8"), (4, False, "int8")])
def test_compressed_tensors_values_are_kept(tiny_tokenizer_dir, tmp_path, bits, symmetric, weights):
    """A pack-quantized checkpoint written by compressed-tensors converts by re-laying out its values: the loaded
    model's weights are the library's decompression of them, value for value, and so are its logits at sparsity 0."""
    from tests.helpers import build_tiny

    source = build_tiny("llama", tmp_path / "float", tiny_tokenizer_dir, dtype=torch.bfloat16)
    reference = compressed_tensors_model(source, tmp_path / "ct", bits, symmetric)
    out = convert(tmp_path / "ct", tmp_path / "out", sparsity=0.5, weights=weights, **CHEAP).output
    wina = json.loads((out / "config.json").read_text())["wina"]
    assert wina["weights"]["source"] == "compressed-tensors" and wina["weights"]["scheme"] == weights
    model = load(out, sparsity=0, gate_prefill=True)
    for name, gate in model.wina.gates.items():
        assert gate.quant.group_in == 16 and gate.quant.group_out == 1 and gate.quant.bits == int(weights[3])
        assert torch.equal(gate.weight.detach(), reference.get_submodule(name).weight.detach()), name
    ids = heldout_ids(source)
    with torch.no_grad():
        assert relative_error(reference.float()(ids).logits, model.float()(ids).logits) < 1e-5


def test_compressed_tensors_we_cannot_keep_is_refused_in_one_line(tiny_tokenizer_dir, tmp_path, capsys):
    from tests.helpers import build_tiny

    source = build_tiny("llama", tmp_path / "float", tiny_tokenizer_dir, dtype=torch.bfloat16)
    compressed_tensors_model(source, tmp_path / "ct", 8, True)
    code, _, err = run(capsys, "convert", tmp_path / "ct", "-o", tmp_path / "a", "--weights", "int4", "--no-calibrate")
    assert_one_line_error(code, err, "int4 cannot hold exactly")
    code, _, err = run(capsys, "convert", tmp_path / "ct", "-o", tmp_path / "b", "--no-calibrate")  # floats: the old refusal
    assert_one_line_error(code, err, "quantized model (compressed-tensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inspect_eval_and_card_say_what_the_weights_are(quantized, capsys):
    """inspect's planned bytes per token at sparsity 0 are the stored bytes of the gated matrices (codes, scales,
    offsets, counted here from the files' tensors), the head and one embedding row; eval's measured ones agree at
    the target; the card names the scheme."""
    from wina_convert.evaluate.inspect import describe
    from wina_convert.evaluate.perplexity import evaluate
    from wina_convert.hub.card import model_card

    _, checkpoint = quantized["mistral", 4]
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    gated = 0
    for name in weight_map:
        if name.rpartition(".")[2] in ("qweight", "scales", "offsets"):
            t = stored(checkpoint, name.rpartition(".")[0])[name]
            gated += t.numel() * t.element_size()
    head = stored(checkpoint, "lm_head")["lm_head.weight"]
    embed = stored(checkpoint, "model.embed_tokens")["model.embed_tokens.weight"]
    info = describe(checkpoint)
    assert info["weights"] == f"int4 (groups of {GROUP} outputs)"
    dense = gated + head.numel() * head.element_size() + embed.shape[1] * embed.element_size()
    assert info["bytes_per_token"] == pytest.approx(dense - 0.5 * gated, rel=0.02)  # the target's planned bytes
    result = evaluate(checkpoint, seq_len=128, max_tokens=512)
    assert result["weights"] == info["weights"]
    assert result["bytes_per_token"] == pytest.approx(info["bytes_per_token"], rel=0.05)
    card = model_card(checkpoint)
    assert "| gated weights | int4 (round to nearest, a float16 scale per 16 outputs" in card and "library_name: wina-convert" in card
    code, out, _ = run(capsys, "inspect", checkpoint)
    assert code == 0 and "int4 (groups of 16 outputs)" in out


@pytest.mark.parametrize("bits", [4, 8])
def test_input_channel_scaling_is_absorbed_by_the_row_groups(bits):
    """Why an activation-aware per-input-channel scaling (AWQ's) cannot help this layout: a group lies within one
    input row, so scaling input channel i by s_i scales its row's groups, and round to nearest gives s_i times the
    same codes; only the float16 rounding of the stored scales differs. ``Q(W diag(s)) diag(1/s) == Q(W)``."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 48, generator=g)
    s = torch.exp2(torch.randint(-3, 4, (48,), generator=g).float())  # powers of two: float16 scales scale exactly
    plain = quantize_rtn(w, bits, 16)
    scaled = quantize_rtn(w * s, bits, 16)
    assert torch.equal(plain.qweight, scaled.qweight)
    assert torch.equal(scaled.dequantize() / s, plain.dequantize())
    s = 0.5 + torch.rand(48, generator=g)  # any scale: the same codes but where float16 scales move a tie
    scaled = quantize_rtn(w * s, bits, 16)
    flips = (scaled.codes() - plain.codes()).abs()
    assert flips.max() <= 1 and flips.float().mean() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_is_rtn_for_uncorrelated_inputs_and_better_for_correlated_ones(bits):
    """quantize_gptq: with a diagonal Hessian (independent inputs) no error has anywhere to go and it is round to
    nearest, code for code; with correlated inputs its output error ``sum_t ||(W - Q) x_t||^2`` is below RTN's."""
    from wina_convert.quant import quantize_gptq

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 80, generator=g)
    diagonal = torch.diag(torch.rand(80, generator=g, dtype=torch.float64) + 0.5)
    rtn = quantize_rtn(w, bits, 16)
    same = quantize_gptq(w, bits, 16, diagonal, block=24)
    assert torch.equal(same.qweight, rtn.qweight) and torch.equal(same.scales, rtn.scales)
    x = torch.randn(4000, 80, generator=g) @ torch.randn(80, 80, generator=g) * 0.3 + torch.randn(4000, 80, generator=g)
    gptq = quantize_gptq(w, bits, 16, x.double().T @ x.double(), block=24)
    error = lambda q: float(((x @ (w - q.dequantize()).T) ** 2).sum())
    assert error(gptq) < 0.8 * error(rtn)
    assert (gptq.group_in, gptq.group_out, gptq.bits) == (1, 16, bits)


@pytest.mark.slow
def test_smollm2_int4_sparsity0_equals_its_dequantized_model(smollm2_hf, tmp_path):
    out = convert(smollm2_hf, tmp_path / "q", weights="int4", calibrate=False, quiet=True).output
    reference = dequantized_reference(smollm2_hf, 4, 64)
    model = load(out, sparsity=0, gate_prefill=True)
    ids = heldout_ids(smollm2_hf)
    with torch.no_grad():
        assert relative_error(reference(ids).logits, model(ids).logits) < 1e-5


def test_bench_counts_the_stored_bytes(quantized):
    """wina bench's dense bytes per token count a quantized gate's codes, scales and offsets, not its float copy,
    and a gated row skips its share of them."""
    from wina_convert.evaluate.bench import bench

    _, checkpoint = quantized["qwen2", 4]
    model = load(checkpoint, sparsity=0, kernels=False, gate_prefill=True)
    result = bench(model, sparsities=(0.5,), tokens=4, prompt_tokens=4)
    gates = [g for n, g in model.wina.gates.items() if n != model.wina.head]
    assert result["bytes"]["gated"] == sum(g.quant.nbytes for g in gates)
    row = result["rows"][0]
    assert 0 < result["bytes"]["dense_per_token"] - row["bytes_per_token"] < result["bytes"]["gated"]
