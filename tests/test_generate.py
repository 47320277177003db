"""The decode loop shared by `wina generate` and `wina serve`: the tokens of transformers' own ``generate``,
text that streams out in pieces joining to the decoded whole, stop strings cut as OpenAI's are, repeatable samples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import original_model
from wina_convert import WinaError, convert, load
from wina_convert.generate import (Detokenizer, Sampling, StopStrings, generate, prompt_ids, stream_generate)

PROMPT = "The history of the city begins"


@pytest.fixture(scope="module")
def sparse_llama(tiny_models, tmp_path_factory):
    """A tiny Llama converted with calibration (uniform allocation: the quickest) and loaded at 0.5."""
    out = tmp_path_factory.mktemp("generate") / "llama"
    convert(tiny_models["llama"], out, sparsity=0.5, samples=4, seq_len=64, allocation="uniform", head_sparsity=0, quiet=True)
    return load(out), AutoTokenizer.from_pretrained(out)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_greedy_tokens_equal_transformers_generate(which, tiny_models, tiny_gemma3):
    """Plain transformers models (one with sliding-window layers): the same tokens as ``model.generate``."""
    directory = tiny_gemma3 if which == "gemma3" else tiny_models["llama"]
    model, tok = original_model(directory), AutoTokenizer.from_pretrained(directory)
    ids = prompt_ids(tok, PROMPT, chat=False)
    result = generate(model, tok, ids, 16)
    reference = _hf_greedy(model, ids, 16)
    assert result.tokens == reference[:len(result.tokens)]
    assert result.finish_reason == ("length" if len(result.tokens) == 16 else "stop")


def test_greedy_on_the_sparse_model(sparse_llama):
    model, tok = sparse_llama
    assert model.wina.sparsity == 0.5
    ids = prompt_ids(tok, PROMPT, chat=False)
    result = generate(model, tok, ids, 24)
    assert result.tokens == _hf_greedy(model, ids, 24)[:len(result.tokens)]
    # the text is the decode of the tokens (an end-of-sequence token is not text)
    kept = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
    assert result.text == tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert result.prompt_tokens == len(ids) and result.decode_tokens_per_second > 0


def test_a_static_cache_is_kept_and_gives_the_same_tokens(tiny_models):
    """The static-cache path (CUDA's, made to run here): the tokens of the dynamic cache, and the slot's cache
    reset and reused by the next generation of a similar length (so CUDA graphs recorded on it replay)."""
    from wina_convert.generate import CacheSlot

    model, tok = original_model(tiny_models["llama"]), AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = prompt_ids(tok, PROMPT, chat=False)
    dynamic = generate(model, tok, ids, 12).tokens
    model.generation_config.cache_implementation = "static"
    slot = CacheSlot()
    assert generate(model, tok, ids, 12, cache=slot).tokens == dynamic
    kept = slot.cache
    assert generate(model, tok, ids[:-2], 14, cache=slot).tokens == generate(model, tok, ids[:-2], 14).tokens
    assert slot.cache is kept and slot.size == 256
    assert generate(model, tok, ids, 256 - len(ids) + 1, cache=slot).tokens[:12] == dynamic and slot.size == 512


def test_streamed_pieces_join_to_the_text(sparse_llama):
    model, tok = sparse_llama
    ids = prompt_ids(tok, PROMPT, chat=False)
    for sampling in (Sampling(), Sampling(temperature=1.2, seed=3)):
        steps = list(stream_generate(model, tok, ids, 16, sampling=sampling))
        assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1) and steps[-1].finish_reason
        assert "".join(s.text for s in steps) == generate(model, tok, ids, 16, sampling=sampling).text


def test_detokenizer_keeps_split_characters_whole(tiny_models):
    """Byte-level tokens split multi-byte characters: no piece carries half of one, and the pieces join to the
    tokenizer's decode of the whole."""
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "naïve café — 東京 🚀 done"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.split())  # the rare characters take several tokens each
    detok = Detokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_cut_the_text(sparse_llama):
    model, tok = sparse_llama
    ids = prompt_ids(tok, PROMPT, chat=False)
    whole = generate(model, tok, ids, 24).text
    assert len(whole) > 12
    stop = whole[8:11]
    cut = whole[:whole.index(stop)]
    result = generate(model, tok, ids, 24, stop=["never there", stop])
    assert (result.text, result.finish_reason) == (cut, "stop")
    assert "".join(s.text for s in stream_generate(model, tok, ids, 24, stop=[stop])) == cut


def test_stop_strings_hold_back_a_possible_start():
    stopper = StopStrings(("END",))
    assert stopper.add("abc E") == "abc "  # "E" may start "END"
    assert stopper.add("N") == ""
    assert stopper.add("x") == "ENx"  # it did not
    assert stopper.add("yEN") == "y"
    assert stopper.add("D and more") == "" and stopper.stopped and stopper.text == "abc ENxy"


def test_sampling_is_repeatable_by_seed(sparse_llama):
    model, tok = sparse_llama
    ids = prompt_ids(tok, PROMPT, chat=False)
    first = generate(model, tok, ids, 12, sampling=Sampling(temperature=1.0, seed=7)).tokens
    assert generate(model, tok, ids, 12, sampling=Sampling(temperature=1.0, seed=7)).tokens == first
    assert generate(model, tok, ids, 12, sampling=Sampling(temperature=1.0, seed=8)).tokens != first
    # a nucleus of one token is greedy, whatever the temperature
    greedy = generate(model, tok, ids, 12).tokens
    assert generate(model, tok, ids, 12, sampling=Sampling(temperature=1.5, top_p=0.0, seed=1)).tokens == greedy


def test_context_and_empty_prompt_are_errors(sparse_llama):
    model, tok = sparse_llama
    with pytest.raises(WinaError, match="context"):
        generate(model, tok, [1] * 500, 13)  # the tiny models' context is 512
    with pytest.raises(WinaError, match="empty"):
        generate(model, tok, [], 5)


@pytest.mark.gpu
def test_cuda_decode_replays_graphs_and_keeps_greedy_tokens(tiny_models, tmp_path):
    """On CUDA the loop decodes through the runtime's CUDA graphs (recorded on the kept static cache, replayed
    by the next request too) and makes the tokens of transformers' ``generate`` on the same kernels.
    Run on the device machine: ``pytest -m gpu tests/test_generate.py``."""
    from wina_convert.generate import CacheSlot
    from wina_convert.runtime.kernels import backend

    if not (torch.cuda.is_available() and backend.triton_available("cuda")):
        pytest.skip("needs CUDA and triton")
    out = convert(tiny_models["llama"], tmp_path / "llama", sparsity=0.5, samples=4, seq_len=64, allocation="uniform",
                  head_sparsity=0, quiet=True).output
    model, tok = load(out, device="cuda"), AutoTokenizer.from_pretrained(out)
    ids = prompt_ids(tok, PROMPT, chat=False)
    slot = CacheSlot()
    first = generate(model, tok, ids, 24, cache=slot)
    replays = model.wina_decode.replays
    assert replays > 0
    again = generate(model, tok, ids, 24, cache=slot)
    assert again.tokens == first.tokens and model.wina_decode.replays >= replays + len(first.tokens) - 2
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                                   pad_token_id=0)[0, len(ids):].tolist()
    assert first.tokens == reference[:len(first.tokens)]
