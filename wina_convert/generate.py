"""Text from a loaded model, one prompt at a time: the decode loop that ``wina generate`` and ``wina serve`` share.

Batch-1 decode is where activation sparsity pays (every step reads the weights once for one token), so the
loop is the plain one: the prompt is one forward into a KV cache, then each step feeds the last token back.
On CUDA ``wina_convert.load`` makes the model's cache static and its decode steps CUDA graphs
(``runtime/graphs.py``); the loop follows that (``runner_of``), so what it generates is what
``model.generate`` would, on the same kernels.

``stream_generate`` yields one ``Step`` per token with the text that token completes: text is decoded
incrementally (a window of recent tokens, so a character split over several byte-level tokens is emitted
once it is whole) and held back while it could still be the start of a stop string, so the steps' texts
joined are exactly the final text, the stop string excluded. Closing the iterator (or no longer pulling
from it) stops the generation: that is how a server drops a request whose client left.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import WinaError

# The KV cache goes to the forward as ``past_key_values``, the name the CUDA-graph runner recognizes
# (runtime/graphs.py); transformers 5.25 renames it ``cache`` and warns about the old name at every call site.
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

# a static KV cache is allocated in steps of this many positions, so that requests of similar lengths
# share one cache (and the CUDA graphs recorded on it)
CACHE_STEP = 256


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the softmax of
    ``logits / temperature`` restricted to the smallest set of tokens whose probability reaches ``top_p``
    (nucleus sampling; 0 keeps the most likely token alone). ``seed`` makes the samples repeatable (None: fresh randomness)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature:
            raise WinaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise WinaError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Step:
    """One generated token and the text it completes (empty while text is held back)."""

    token: int
    text: str
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length", None: more follow


@dataclass
class Generation:
    """A whole generation: the text (stop string excluded), its tokens, why it ended, and how long it took."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    prefill_seconds: float  # the prompt's forward and the first token
    decode_seconds: float  # every later token

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first (the decode speed, prompt excluded); 0 with one token."""
        later = len(self.tokens) - 1
        return later / self.decode_seconds if later > 0 and self.decode_seconds > 0 else 0.0


# --------------------------------------------------------------------------- prompts

def context_length(model: Any) -> int:
    """How many positions (prompt and generated tokens together) the model was trained for."""
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 0:
        raise WinaError("the model's config has no max_position_embeddings: cannot tell its context length")
    return length


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """The prompt's token ids: as a user turn in the tokenizer's chat template with ``chat`` (when it has one),
    else the text encoded as it is (with the tokenizer's own special tokens, e.g. a BOS)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """``messages`` (role, content) in the tokenizer's chat template, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise WinaError("this model's tokenizer has no chat template: send raw text as a completion instead")
    try:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception (e.g. roles that must alternate)
        raise WinaError(f"the chat template refused the messages: {' '.join(str(e).split())}") from e
    return list(encoded["input_ids"])


def end_tokens(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a generation: the model's generation config's end-of-sequence ids and the tokenizer's
    (a chat model's end of turn is often only the latter)."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


# --------------------------------------------------------------------------- text out

class Detokenizer:
    """Token ids in, new text out, in O(1) decode work per token.

    Decoding ids one at a time breaks characters that span several byte-level tokens and drops the space a
    SentencePiece token carries at the start of a sequence. So each step decodes a window: the tokens from
    ``start`` (the last emitted boundary, one token back) to the end, minus the decode of the window up to
    ``end`` (what was already emitted); the text past the latter is the new text. A difference ending in U+FFFD is an
    incomplete character: it waits for the next token. The texts emitted join to ``tokenizer.decode(all)``
    (special tokens skipped, no clean-up of spaces: those edits would change text already sent).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.start = 0  # the window's first token
        self.end = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.start:self.end])
        now = self._decode(self.tokens[self.start:])
        if now.endswith("\ufffd"):
            return ""
        self.start, self.end = self.end, len(self.tokens)
        return now[len(before):]

    def flush(self) -> str:
        """What is left undecoded (an incomplete character stays U+FFFD) at the end of the generation."""
        before = self._decode(self.tokens[self.start:self.end])
        now = self._decode(self.tokens[self.start:])
        self.start = self.end = len(self.tokens)
        return now[len(before):]


@dataclass
class StopStrings:
    """Text in, text that can be sent out: ends the text at the first stop string (excluded, as OpenAI's
    ``stop`` does) and holds back a tail that could still become one."""

    stops: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = field(default=False, init=False)

    def add(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            return self._send(len(self.text))
        # a stop string can start at most len(stop) - 1 characters before the unsent text
        begin = max(0, self.sent - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._send(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out


# --------------------------------------------------------------------------- the loop

class CacheSlot:
    """Keeps one static KV cache between generations (CUDA: the decode graphs are recorded per cache, so a
    fresh cache per request would record them again each time). Sizes go up in steps of ``CACHE_STEP``; a
    dynamic cache (CPU) is made fresh, as it costs nothing to make."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.size = 0

    def get(self, model: Any, length: int) -> Any:
        """A cache for ``length`` positions: static when the model's generation config says so (``load`` does
        on CUDA), else dynamic."""
        from transformers import DynamicCache, StaticCache

        if getattr(model.generation_config, "cache_implementation", None) != "static":
            return DynamicCache(config=model.config)
        size = min(-(-length // CACHE_STEP) * CACHE_STEP, max(length, context_length(model)))
        if self.cache is not None and self.size == size:
            self.cache.reset()
        else:
            self.cache = None  # free the old one first
            self.cache, self.size = StaticCache(config=model.config, max_cache_len=size), size
        return self.cache


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token id (a ``[1, 1]`` tensor on the logits' device) from the last position's ``[1, V]`` logits."""
    from .runtime.graphs import argmax_last

    if sampling.greedy:
        return argmax_last(logits)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the probability before it is still short of top_p; the first always
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        drop[..., 0] = False
        probs = probs.masked_fill(drop, 0.0)
        return order.gather(-1, torch.multinomial(probs, 1, generator=generator))
    return torch.multinomial(probs, 1, generator=generator)


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


@torch.no_grad()
def stream_generate(model: Any, tokenizer: Any, prompt: Sequence[int], max_tokens: int, *,
                    sampling: Sampling = Sampling(), stop: Iterable[str] = (), cache: CacheSlot | None = None) -> Iterator[Step]:
    """Generate up to ``max_tokens`` tokens after ``prompt`` (token ids), one ``Step`` per token.

    Ends at an end-of-sequence token (``end_tokens``; not part of the text), at the first of the ``stop``
    strings (excluded from the text), or after ``max_tokens`` tokens; the last step says which. Raises
    ``WinaError`` when the prompt is empty or prompt and ``max_tokens`` do not fit the context.
    """
    from .runtime.graphs import runner_of

    prompt = list(prompt)
    if not prompt:
        raise WinaError("the prompt is empty: it needs at least one token")
    if max_tokens < 1:
        raise WinaError(f"max_tokens must be at least 1, got {max_tokens}")
    context = context_length(model)
    if len(prompt) + max_tokens > context:
        raise WinaError(f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the model's context "
                        f"of {context} tokens")
    stops = tuple(s for s in stop if s)
    ends = end_tokens(model, tokenizer)
    device = next(model.parameters()).device
    generator = _generator(sampling, device)
    text = Detokenizer(tokenizer)
    stopper = StopStrings(stops)
    kv = (cache or CacheSlot()).get(model, len(prompt) + max_tokens)

    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model(input_ids=ids, past_key_values=kv, use_cache=True, logits_to_keep=1)
    step = runner_of(model)
    for produced in range(1, max_tokens + 1):
        next_id = _choose(out.logits[:, -1], sampling, generator)
        token = int(next_id)
        if token in ends:
            yield Step(token, stopper.add(text.flush()) + stopper.flush(), "stop")
            return
        piece = stopper.add(text.add(token))
        if stopper.stopped:
            yield Step(token, piece, "stop")
            return
        if produced == max_tokens:
            yield Step(token, piece + stopper.add(text.flush()) + stopper.flush(), "stop" if stopper.stopped else "length")
            return
        yield Step(token, piece)
        out = step(input_ids=next_id.view(1, 1), past_key_values=kv, use_cache=True, logits_to_keep=1)


def generate(model: Any, tokenizer: Any, prompt: Sequence[int], max_tokens: int, *, sampling: Sampling = Sampling(),
             stop: Iterable[str] = (), cache: CacheSlot | None = None) -> Generation:
    """``stream_generate`` run to the end: the whole text, its tokens, and the time of the prompt and of the decode."""
    started = time.perf_counter()
    first = None
    tokens: list[int] = []
    pieces: list[str] = []
    finish = "length"
    for s in stream_generate(model, tokenizer, prompt, max_tokens, sampling=sampling, stop=stop, cache=cache):
        if first is None:
            first = time.perf_counter()
        tokens.append(s.token)
        pieces.append(s.text)
        finish = s.finish_reason or finish
    done = time.perf_counter()
    first = first or done
    return Generation("".join(pieces), tokens, len(list(prompt)), finish, first - started, done - first)
