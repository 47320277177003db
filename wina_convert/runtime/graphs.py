"""Fast one-token decode on CUDA: a static KV cache, and the whole step replayed from a CUDA graph.

Batch-1 decode is memory bound, but a decode step of an 8B model is ~1000 kernel launches, and the
gated GEMVs cost more host time to launch than the GPU needs to run them (docs/kernels.md). So the
step is recorded once into a CUDA graph and replayed: one launch per token.

``DecodeGraphs`` wraps a model's forward. A call qualifies when it decodes one position per sequence into
a transformers ``StaticCache`` (whose position counter is a device tensor, so a replay advances it) with
autograd off. For each distinct call signature (the cache object, the shapes of the tensor arguments, the
other arguments) the first call runs eagerly with the kernels (triton compiles, the workspace exists), the
second records the graph and replays it, and later ones copy their tensor arguments into the graph's input
buffers and replay. Any other call runs the model as it is. While a step is recorded or replayed a gate's
``counting`` is off (which selects the kernels); a gate that was counting sets ``tally`` instead and counts on
the device (``GatedLinear.count``), so ``model.wina.stats()`` includes the replayed steps (``model.wina.
set_counting(False)`` leaves the counting out of the graph, as the speed benchmarks do); in a sparse configuration every
gate bound to a kernel takes it, also one whose thresholds are all zero (see ``DecodeGraphs.fast``).

Thresholds are read from their tensors' addresses at recording time, and the path of every gate (dense,
kernel) is decided then: any ``set_thresholds`` (``model.wina.set_sparsity``) bumps the model's ``GateContext.epoch``
and drops every recorded graph.

With ``compile=True`` the recorded step is the ``torch.compile``'d forward (inductor, no cudagraphs of its
own): the ~30 small element-wise kernels of a decoder layer (norms, rotary, residual adds, the MLP's
activation) fuse into a few, which matters when a layer's weights take only ~100 us to read. Compiling an
8B model takes a minute or more, once per gate configuration (dense, gated).

``model.generate`` uses it by itself: ``enable_decode_graphs`` makes ``cache_implementation="static"`` the
model's default and answers transformers' ``get_compiled_call`` (which ``generate`` asks for the decode
steps when the cache is static) with the runner.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch

from .modules import GatedLinear


def _static_layer_class():
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:  # pragma: no cover - transformers without layered caches
        return None
    return StaticLayer


class _Graph:
    """One recorded decode step: its input buffers, the graph, and the outputs it writes."""

    def __init__(self, cache: Any, inputs: dict[str, torch.Tensor], graph: torch.cuda.CUDAGraph, out: Any):
        self.cache = cache  # held, so that its id (part of the key) cannot be reused while the graph lives
        self.inputs = inputs
        self.graph = graph
        self.out = out

    def run(self, kwargs: dict[str, Any]) -> Any:
        for place, value in _tensors(kwargs).items():
            buf = self.inputs[place]
            if value is not buf:
                buf.copy_(value)
        self.graph.replay()
        return _fresh_output(self.out)


def _tensors(kwargs: dict[str, Any]) -> dict[tuple[str, Any], torch.Tensor]:
    """Every tensor argument by place: ``(name, None)``, or ``(name, key)`` inside a dict argument (the
    per-layer-type attention masks that Qwen2 and others pass as ``{"full_attention": mask, ...}``)."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out[(name, None)] = value
        elif isinstance(value, dict):
            out.update({(name, k): v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


def _with_tensors(kwargs: dict[str, Any], tensors: dict[tuple[str, Any], torch.Tensor]) -> dict[str, Any]:
    """``kwargs`` with its tensors (places as in ``_tensors``) replaced by ``tensors``."""
    out = dict(kwargs)
    for (name, key), tensor in tensors.items():
        if key is None:
            out[name] = tensor
        else:
            out[name] = {**out[name], key: tensor}  # a new dict: the caller's is left as it was
    return out


def _fresh_output(out: Any) -> Any:
    """The outputs of a replay, with every tensor copied out of the graph's buffers (the next replay
    overwrites them); the cache is passed through."""
    fields = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    return type(out)(**fields)


class DecodeGraphs:
    """Replays a CUDA graph of the model's one-position forward (static KV cache); see the module doc."""

    def __init__(self, model: torch.nn.Module, gates: Iterable[GatedLinear], *, compile: bool = False, max_graphs: int = 2):
        self.model = model
        self.gates = list(gates)
        self.compile = compile
        self.max_graphs = max_graphs
        self.enabled = True
        self.captures = 0
        self.replays = 0
        self.failures: dict[Any, str] = {}
        self._graphs: OrderedDict[Any, _Graph] = OrderedDict()
        self._warm: OrderedDict[Any, Any] = OrderedDict()
        self.context = self.gates[0].context if self.gates else None
        self._epoch = self.epoch
        self._compiled = None
        self._compiled_flag = None
        self._stream: torch.cuda.Stream | None = None

    # -- what qualifies --------------------------------------------------------------------------------
    def eligible(self, kwargs: dict[str, Any]) -> bool:
        """A one-position decode into a static cache, on CUDA, without autograd or extra outputs."""
        if not self.enabled or torch.is_grad_enabled() or not torch.cuda.is_available():
            return False
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_cuda:
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if kwargs.get("return_dict") is False:
            return False
        cache = kwargs.get("past_key_values")
        static = _static_layer_class()
        layers = getattr(cache, "layers", None)
        if static is None or not layers or not getattr(cache, "is_compileable", False):
            return False
        # exactly StaticLayer: the sliding-window layers keep their position in a Python int, which a
        # replay would not advance
        if any(type(layer) is not static or not getattr(layer, "is_initialized", False) for layer in layers):
            return False
        return all(t.is_cuda for t in _tensors(kwargs).values())

    def key(self, kwargs: dict[str, Any]) -> Any:
        parts = [id(kwargs["past_key_values"])]
        for name in sorted(kwargs):
            if name == "past_key_values":
                continue
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                parts.append((name, tuple(value.shape), value.dtype, value.device))
            elif isinstance(value, dict):
                parts.append((name, tuple(sorted(
                    (k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v) for k, v in value.items()))))
            else:
                parts.append((name, value))
        return tuple(parts)

    # -- calling ---------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._follow_weights()
        if args or not self.eligible(kwargs):
            return self.model(*args, **kwargs)
        if self.epoch != self._epoch:
            self.reset()
        try:
            key = self.key(kwargs)
            hash(key)
        except TypeError:  # an argument that cannot be part of a key
            return self.model(**kwargs)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
            return graph.run(kwargs)
        if key in self.failures:
            return self.model(**kwargs)
        if key not in self._warm:
            self._warm[key] = kwargs["past_key_values"]
            while len(self._warm) > 2 * self.max_graphs:
                self._warm.popitem(last=False)
            return self.step(kwargs)
        try:
            graph = self._record(kwargs)
        except Exception as e:  # noqa: BLE001 - anything the step cannot record (a host sync): run eagerly
            self.failures[key] = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize()
            return self.model(**kwargs)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        self.captures += 1
        self.replays += 1
        return graph.run(kwargs)

    def _follow_weights(self) -> None:
        """After ``model.to(dtype/device)`` the kernels' packed weights are stale (and a recorded graph
        reads freed memory): repack every group, which also drops the graphs. One group is checked per
        call (a whole-model ``.to`` moves them all)."""
        hooks = getattr(self, "_hooks", None)
        if hooks is None:
            hooks = self._hooks = list({id(g.kernel): g.kernel for g in self.gates
                                        if g.kernel is not None and hasattr(g.kernel, "stale")}.values())
        if hooks and hooks[0].stale():
            for hook in hooks:
                if hook.stale():
                    hook.repack()

    def compiled_call(self, compile_config: Any = None) -> "DecodeGraphs":
        """transformers' ``get_compiled_call``: ``generate`` runs its decode steps through this runner."""
        return self

    def reset(self) -> None:
        """Drop every recorded graph (and the memory it holds)."""
        self._graphs.clear()
        self._warm.clear()
        self.failures.clear()
        self._epoch = self.epoch

    @property
    def epoch(self) -> int:
        """The epoch of this model's gates (``GateContext``): another model's ``set_sparsity`` leaves it alone."""
        return self.context.epoch if self.context is not None else 0

    @contextlib.contextmanager
    def fast(self) -> Iterator[None]:
        """Inside the block gates count nothing (which selects their kernels) and, when any gate is
        active, every gate bound to a kernel takes it, those with all-zero thresholds too (the kernel
        at sparsity 0 is as fast as cuBLAS, and one path for every sparse configuration means one
        ``torch.compile`` for all of them). With no gate active (sparsity 0) the step stays dense."""
        saved = [(g.counting, g.active, g.tally) for g in self.gates]
        sparse = any(g.active for g in self.gates)
        for g in self.gates:
            g.tally = g.counting  # a counting gate counts on the kernel path: on the device, so replays count
            g.counting = False
            if sparse and g.kernel is not None:
                g.active = True
        for hook in {id(g.kernel): g.kernel for g in self.gates if g.kernel is not None}.values():
            refresh = getattr(hook, "refresh", None)
            if refresh is not None:
                refresh()
        try:
            yield
        finally:
            for g, (counting, active, tally) in zip(self.gates, saved):
                g.counting, g.active, g.tally = counting, active, tally

    def forward_fn(self):
        """The forward that is run and recorded: the model's, or its ``torch.compile``'d version."""
        if not self.compile:
            return self.model
        if self._compiled is None or self._compiled_flag is not self.compile:
            self._compiled = torch.compile(self.model, dynamic=False)
            self._compiled_flag = self.compile
        return self._compiled

    def step(self, kwargs: dict[str, Any]) -> Any:
        """One eager step through the kernels (no graph), on the stream that records the graphs, so that
        per-stream state (cuBLAS workspaces, triton's compiled kernels) exists before any recording."""
        main = torch.cuda.current_stream()
        side = self._side_stream()
        side.wait_stream(main)
        with self.fast(), torch.cuda.stream(side):
            out = self.forward_fn()(**kwargs)
        main.wait_stream(side)
        for value in out.values() if hasattr(out, "values") else ():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(main)  # used on the caller's stream from now on
        return out

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _record(self, kwargs: dict[str, Any]) -> _Graph:
        cache = kwargs["past_key_values"]
        inputs = {place: t.clone() for place, t in _tensors(kwargs).items()}
        static = _with_tensors(kwargs, inputs)
        fn = self.forward_fn()
        graph = torch.cuda.CUDAGraph()
        with self.fast(), torch.cuda.graph(graph, stream=self._side_stream()):
            out = fn(**static)
        if not hasattr(out, "items"):
            raise TypeError("the model returned a tuple; decode graphs need return_dict")
        return _Graph(cache, inputs, graph, out)


def enable_decode_graphs(model: torch.nn.Module, gates: Iterable[GatedLinear], *, compile: bool = False) -> DecodeGraphs | None:
    """Make ``model.generate`` (and ``model.wina_decode(...)``) decode through CUDA graphs on CUDA.

    Sets the model's default cache to ``"static"`` (unless one was chosen) and routes transformers'
    ``get_compiled_call`` to the runner, which ``generate`` uses for its decode steps when the cache is
    static. Returns the runner (also ``model.wina_decode``), or None off CUDA.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return None
    if device.type != "cuda":
        return None
    runner = DecodeGraphs(model, gates, compile=compile)
    model.wina_decode = runner
    model.get_compiled_call = runner.compiled_call
    config = getattr(model, "generation_config", None)
    if config is not None and getattr(config, "cache_implementation", None) is None:
        config.cache_implementation = "static"
    return runner


def runner_of(model: torch.nn.Module):
    """The model's decode runner (``model.wina_decode``), or the model itself (CPU, no graphs)."""
    return getattr(model, "wina_decode", None) or model


@functools.lru_cache(maxsize=None)
def _argmax_split(vocab: int) -> tuple[int, int]:
    """(chunk, padding) for a two-stage argmax over ``vocab`` entries: the divisor of ``vocab`` in [128, 1024]
    nearest to sqrt(vocab) (as many chunks as entries per chunk), else 512 with padding."""
    root = vocab**0.5
    divisors = [c for c in range(128, 1025) if vocab % c == 0]
    if divisors:
        return min(divisors, key=lambda c: abs(c - root)), 0
    return 512, -vocab % 512


def argmax_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1, keepdim=True)`` for ``[B, V]``, in two stages (chunk maxima, then the best chunk).

    torch's single-row argmax over a vocabulary of 128k entries takes ~28 us on an H100 (one block does the
    row); per token that is more than a transformer layer's norm, attention and activation together. Ties
    resolve to the first index, as ``argmax`` does.
    """
    batch, vocab = scores.shape
    if vocab < 4096:
        return scores.argmax(-1, keepdim=True)
    chunk, pad = _argmax_split(vocab)
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    best, where = scores.reshape(batch, -1, chunk).max(-1)  # [B, chunks]
    block = best.argmax(-1, keepdim=True)
    return block * chunk + where.gather(-1, block)


@torch.no_grad()
def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, *, cache: Any = None,
           on_step=None) -> torch.Tensor:
    """Greedy decoding with a static cache through the model's runner: ``[B, new_tokens]`` token ids.

    The prompt is one ordinary forward; each next token is fed back on the device (no host sync per
    token). ``on_step(i)`` is called before step ``i`` is launched (the benchmark records events there).
    """
    from transformers import StaticCache

    batch, prompt = input_ids.shape
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens + 1)
    else:
        cache.reset()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = runner_of(model)
    tokens = torch.empty(batch, new_tokens, dtype=torch.long, device=input_ids.device)
    next_ids = argmax_last(out.logits[:, -1])
    for i in range(new_tokens):
        tokens[:, i : i + 1] = next_ids
        if i == new_tokens - 1:
            break
        if on_step is not None:
            on_step(i)
        out = step(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_ids = argmax_last(out.logits[:, -1])
    if on_step is not None:
        on_step(new_tokens - 1)
    return tokens
