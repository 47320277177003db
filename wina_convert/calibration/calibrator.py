"""The calibrator (docs/method.md section 3): score quantiles and per-gate sparsity allocation, layer by layer.

The calibrator receives the converted weights one decoder layer at a time and keeps only the
calibration hidden states ``[samples, seq_len, d]`` between layers, so memory is one layer plus
the activations. For each layer it

1. runs the layer dense on the hidden states and records, for every gated matrix, the quantiles of
   its scores (``|x_i| * ||W[:, i]||`` for WINA, ``|x_i|`` for TEAL) over calibration tokens;
2. allocates sparsity among the layer's matrices: ``uniform`` (each at the layer's level) or
   ``greedy`` (each matrix's layer-output error curve is measured alone on a token subset, then
   the matrix with the least error per skipped parameter is sparsified next, recording the
   allocation at every layer level from 0 to 0.9);
3. propagates the hidden states through the layer *gated at the target*, re-measuring each gate's
   quantiles on its actual (upstream-gated) input in execution order, so that the next layers see
   the activations the sparse model will produce and the stored thresholds hit the target.

With ``--lowrank`` every gate also gets factors that compensate its dropped channels
(``wina_convert/lowrank.py``): provisional ones, fitted on the curve tokens with every matrix at the
layer's level, are in place while the error curves are measured (so the allocation sees the
compensation); the final ones are fitted in step 3 on the gate's actual input at its thresholds, and
the layer is propagated with them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..arch import Adapter
from ..errors import WinaError
from ..gate import ALLOCATION_LEVELS, MAX_SPARSITY, QUANTILE_LEVELS, column_norms, interp, score_quantiles, thresholds_at
from ..lowrank import extra_fraction, fit_gate
from ..progress import quiet_transformers
from ..runtime.modules import GatedLinear, Shortcut, WinaDecoderLayer
from .allocation import GREEDY_GRID, greedy_path, uniform_path, zero_fraction
from .text import read_texts, token_windows, tokenizer_of

CURVE_TOKENS = 1024  # tokens on which the greedy allocation's error curves are measured
CURVE_WINDOW = 256  # ... as the first positions of several calibration samples
CENTER_TOKENS = 8192  # tokens (drawn uniformly) over which a gate input's center is measured
CHUNK_TOKENS = 1024  # tokens per forward of a sub-block: bounds the transient activations (an MLP's 3 x 14336 wide)
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512


# --------------------------------------------------------------------------- calibration tokens

def load_calibration_tokens(source: Any, spec: str | None, *, samples: int | None, seq_len: int | None, seed: int,
                            device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    samples = DEFAULT_SAMPLES if samples is None else samples
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if samples < 1 or seq_len < 2:
        raise WinaError("--samples must be >= 1 and --seq-len >= 2")
    context = getattr(source.config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise WinaError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens)")
    if spec == "self":
        from .selfgen import self_generated_texts

        texts, name = self_generated_texts(source, samples=samples, seq_len=seq_len, seed=seed, device=device), "self"
    else:
        texts, name = read_texts(spec)
    tokens = token_windows(tokenizer_of(source), texts, samples, seq_len, seed)
    info = {"dataset": name, "samples": int(tokens.shape[0]), "seq_len": seq_len, "seed": seed, "tokens": int(tokens.numel())}
    return tokens.to(device), info


class _Passthrough(nn.Module):
    """Stands in for a sub-block's output linear, so that the sub-block returns that linear's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _bypassed(layer: nn.Module, name: str) -> Iterator[nn.Module]:
    """Temporarily replace submodule ``name`` of ``layer`` by a passthrough; yields the original."""
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    original = getattr(parent, child)
    setattr(parent, child, _Passthrough())
    try:
        yield original
    finally:
        setattr(parent, child, original)


class _Replay(nn.Module):
    """Stands in for a linear whose outputs on this run's chunks are known: returns them in call order."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


@contextlib.contextmanager
def _replayed(layer: nn.Module, outputs: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Temporarily replace the linears named in ``outputs`` by replays of their recorded chunk outputs."""
    originals = []
    for name, recorded in outputs.items():
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        originals.append((parent, child, getattr(parent, child)))
        setattr(parent, child, _Replay(recorded))
    try:
        yield
    finally:
        for parent, child, original in originals:
            setattr(parent, child, original)


# --------------------------------------------------------------------------- the calibrator

class Calibrator:
    """Consumes converted layers in order; produces the sidecar's quantiles and allocations."""

    def __init__(self, config: Any, adapter: Adapter, tokens: torch.Tensor, *, transform: bool, method: str,
                 allocation: str, target: float, device: torch.device, dtype: torch.dtype, info: dict[str, Any],
                 center: str = "none", head_bases: str = "none", lowrank: dict[str, int] | None = None):
        self.config = config
        self.adapter = adapter
        self.tokens = tokens
        self.transform = transform
        self.method = method
        self.allocation = allocation
        self.target = target
        self.device = device
        self.compute_dtype = torch.float32 if device.type == "cpu" else dtype
        self.center = center
        self.head_bases = head_bases
        self.lowrank = {name: r for name, r in (lowrank or {}).items() if r > 0}  # rank per gated linear (relative name)
        self.info = {**info, "allocation": allocation, "method": method, "center": center, "head_bases": head_bases}
        if self.lowrank:
            self.info["lowrank"] = dict(self.lowrank)
        self.extra_fraction: list[float] = []
        self.byte_scale = 1.0  # the layer's gated bytes as floats over as stored (convert --weights sets it per layer)
        self.curves: list[tuple[list[list[tuple[float, float]]], torch.Tensor, torch.Tensor]] = []  # global allocation
        self.generator = torch.Generator().manual_seed(info.get("seed", 0))
        self.hidden: torch.Tensor | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.report: dict[str, list[float]] = {}
        self._config = self._attn_config(config)
        _, self.layer_cls, rotary_cls = adapter.model_classes()
        with torch.device(device):
            self._rotary_module = rotary_cls(config=self._config)
        seq = tokens.shape[1]
        self.position_ids = torch.arange(seq, device=device).unsqueeze(0)
        self._rotary_tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary = self._rotary(adapter.layer_type(config, 0))
        self.mask: torch.Tensor | None = None

    def _rotary(self, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[1, seq, head_dim]``, of the layers of ``layer_type`` (None: the only kind)."""
        if layer_type not in self._rotary_tables:
            probe = torch.zeros(1, self.position_ids.shape[1], 1, device=self.device, dtype=self.compute_dtype)
            args = () if layer_type is None else (layer_type,)
            self._rotary_tables[layer_type] = self._rotary_module(probe, self.position_ids, *args)
        return self._rotary_tables[layer_type]

    def _attention_mask(self, layer: int) -> torch.Tensor | None:
        """``[1, 1, seq, seq]`` (True: attend) for a sliding-window layer whose window is shorter than the
        windows calibrated on; None where causal attention over the whole window is the layer's own."""
        window = self.adapter.sliding_window(self.config, layer)
        seq = self.position_ids.shape[1]
        if window is None or window >= seq:
            return None
        distance = self.position_ids[0, :, None] - self.position_ids[0, None, :]  # query - key
        return ((distance >= 0) & (distance < window))[None, None]

    @staticmethod
    def _attn_config(config: Any) -> Any:
        import copy

        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
        return config

    def embed(self, embedding: torch.Tensor) -> None:
        # Gather the calibration tokens' rows first: a whole embedding table in float32 is 2 GB for Llama-3.
        rows = embedding[self.tokens.to(embedding.device)]
        scale = self.adapter.embed_scale(self.config)
        if scale is not None:  # as the model does it: the factor in the table's dtype, the product too
            rows = rows * torch.tensor(scale).to(rows.dtype)
        self.hidden = rows.to(self.device, self.compute_dtype)

    def _build_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, GatedLinear]]:
        with quiet_transformers(), torch.device("meta"):
            layer = self.layer_cls(self._config, index)
        if self.transform:
            dim = self.config.hidden_size
            layer = WinaDecoderLayer(layer, self.adapter.layer_names(), (Shortcut(dim, device="meta"), Shortcut(dim, device="meta")))
        # Emptied as it is read: the caller hands the layer over, and its copy (bf16, say) is freed
        # tensor by tensor as the compute-dtype copy is built, not held beside all of it.
        state = {k: tensors.pop(k).to(self.device, self.compute_dtype) for k in list(tensors)}
        layer.load_state_dict(state, strict=True, assign=True)
        gates = {}
        for name in self.adapter.gated_linears():
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, child)
            gate = GatedLinear(linear, self.adapter.splits(name, self.config, linear.out_features))
            gate.counting = False
            setattr(parent, child, gate)
            gates[name] = gate
        return layer.eval(), gates

    # ----------------------------------------------------------------------- running sub-blocks

    def _batched(self, hidden: torch.Tensor, fn) -> torch.Tensor:
        """``fn(chunk, positions)`` over chunks of ``batch`` sequences, concatenated.

        The result is written into one preallocated tensor: concatenating a list of chunks would
        hold the output twice (2 x 470 MB for a Llama-3-8B MLP's input to down_proj on 8k tokens).
        """
        out = None
        cos, sin = self.rotary
        count, length = hidden.shape[:2]
        batch = max(1, CHUNK_TOKENS // length)
        for start in range(0, count, batch):
            chunk = hidden[start : start + batch]
            n = chunk.shape[0]
            pos = {"position_embeddings": (cos[:, :length].expand(n, -1, -1), sin[:, :length].expand(n, -1, -1)),
                   "position_ids": self.position_ids[:, :length],
                   "attention_mask": None if self.mask is None else self.mask[..., :length, :length]}
            result = fn(chunk, pos)
            if out is None:
                out = result.new_empty((count, *result.shape[1:]))
            out[start : start + n] = result
            del result
        return out

    def _attention(self, layer: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """The attention sub-block (causal) on its normalized input ``[n, seq, d]``."""
        attn = getattr(layer, self.adapter.attn_module)
        return self._batched(normed, lambda c, pos: attn(hidden_states=c, **pos)[0])

    def _mlp(self, layer: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        mlp = getattr(layer, self.adapter.mlp_module)
        return self._batched(normed, lambda c, pos: mlp(c))

    def _apply(self, gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._batched(x, lambda c, pos: gate(c))

    def _post_norm(self, layer: nn.Module, name: str | None, y: torch.Tensor) -> torch.Tensor:
        """What a sub-block's output ``y`` adds to the residual: ``y``, or ``y`` through the family's
        post-sub-block norm (Gemma)."""
        return y if name is None else self._apply(getattr(layer, name), y)

    @staticmethod
    def _shortcut(layer: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
        shortcut = getattr(layer, name, None)
        return h if shortcut is None else shortcut(h)

    # ----------------------------------------------------------------------- scores

    def _norms(self, gate: GatedLinear) -> torch.Tensor:
        if not hasattr(gate, "column_norms"):
            gate.column_norms = column_norms(gate.weight.detach(), gate.splits)
        return gate.column_norms

    def _quantiles(self, gate: GatedLinear, x: torch.Tensor) -> torch.Tensor:
        """Score quantiles of ``gate`` on its input ``x``, centered by the gate's center if it has one."""
        norms = self._norms(gate)
        if gate.center is not None:
            x = x - gate.center
        return torch.stack([score_quantiles(x, None if self.method == "teal" else norms[p], self.generator)
                            for p in range(len(gate.splits))])

    def _center(self, gates: list[GatedLinear], x: torch.Tensor) -> None:
        """Give the gates that read ``x`` its per-channel center (``--center``: mean or median over tokens)."""
        if self.center == "none":
            return
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > CENTER_TOKENS:
            flat = flat[torch.randperm(flat.shape[0], generator=self.generator)[:CENTER_TOKENS].to(flat.device)]
        c = flat.float().mean(0) if self.center == "mean" else flat.float().median(0).values
        for gate in gates:
            gate.set_center(c)

    def _set(self, gates: dict[str, GatedLinear], quantiles: dict[str, torch.Tensor], sparsities: dict[str, list[float]]) -> None:
        for name, gate in gates.items():
            norms = self._norms(gate)
            gate.set_thresholds(torch.stack([thresholds_at(quantiles[name][p], norms[p], sparsities[name][p], self.method)
                                             for p in range(len(gate.splits))]))

    # ----------------------------------------------------------------------- one layer

    def layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Calibrate decoder layer ``index`` from its final tensors; ``tensors`` is emptied (handed over)."""
        if self.hidden is None:
            raise RuntimeError("Calibrator.embed() must come before the first layer")
        layer, gates = self._build_layer(index, tensors)
        self.rotary = self._rotary(self.adapter.layer_type(self.config, index))
        self.mask = self._attention_mask(index)
        with torch.no_grad():
            inputs, attn_ref, mlp_ref, outputs = self._dense_sample(layer, gates, self._curve_sample())
            for names in self._input_groups():
                self._center([gates[n] for n in names], inputs[names[0]])
            quantiles = {name: self._quantiles(gate, inputs[name]) for name, gate in gates.items()}
            extra = self._extra_fraction(gates)
            self.extra_fraction.append(extra)
            level = self.target + extra if self.target > 0 else 0.0
            if level > MAX_SPARSITY + 1e-9:
                raise WinaError(f"--sparsity {self.target} is too high for this setting: the transform's shortcut rotations "
                                f"and the low-rank factors are {extra:.1%} of a layer's bytes, so its matrices would skip {level:.1%} "
                                f"(at most {MAX_SPARSITY:.0%}); use at most {MAX_SPARSITY - extra:.2f}")
            self._provisional_lowrank(gates, inputs, quantiles, level)
            parts = [(name, p) for name in gates for p in range(len(gates[name].splits))]
            sizes = torch.tensor([gates[n].splits[p] * gates[n].in_features for n, p in parts], dtype=torch.float64)
            free = torch.tensor([zero_fraction(quantiles[n][p]) for n, p in parts], dtype=torch.float64)
            if self.allocation in ("greedy", "global"):
                curves = self._error_curves(layer, gates, quantiles, parts, free, inputs, attn_ref, mlp_ref, outputs)
                alloc = greedy_path(curves, sizes, free)
                if self.allocation == "global":
                    # errors relative to the residual stream's energy at this layer: comparable across layers
                    energy = float(self._curve_sample().float().pow(2).sum()) or 1.0
                    self.curves.append(([[(x, e / energy) for x, e in c] for c in curves], sizes, free))
            else:
                alloc = uniform_path(len(parts), free, sizes)
            del inputs, attn_ref, mlp_ref, outputs
            at_target = interp(level, ALLOCATION_LEVELS, alloc.T).tolist()
            sparsities: dict[str, list[float]] = {name: [] for name in gates}
            for (name, _), s in zip(parts, at_target):
                sparsities[name].append(s)
            self.hidden, quantiles = self._propagate(layer, gates, sparsities)
        prefix = f"{self.adapter.layers_prefix}.{index}"
        for name, gate in gates.items():
            self.tensors[f"{prefix}.{name}.quantiles"] = quantiles[name].float()
            if gate.center is not None:
                self.tensors[f"{prefix}.{name}.center"] = gate.center.float().cpu().clone()
            if gate.lowrank_a is not None:
                self.tensors[f"{prefix}.{name}.lowrank_a"] = gate.lowrank_a.float().cpu().clone()
                self.tensors[f"{prefix}.{name}.lowrank_b"] = gate.lowrank_b.float().cpu().clone()
            role = name.rsplit(".", 1)[-1]
            fraction = sum(s * rows for s, rows in zip(sparsities[name], gate.splits)) / sum(gate.splits)
            self.report.setdefault(role, []).append(fraction)
        self.tensors[f"{prefix}.allocation"] = alloc.float()

    def value_moments(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[G, hd, hd]``: ``E[v v^T]`` of each KV head's values on the calibration tokens reaching layer ``index``.

        ``tensors`` (the layer's final tensors) are not consumed. The values are computed from the
        attention input the sparse model produces at this layer (the upstream layers gated).
        """
        if self.hidden is None:
            raise RuntimeError("Calibrator.embed() must come before the first layer")
        a, config = self.adapter, self.config
        heads, groups = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer, _ = self._build_layer(index, dict(tensors))
        name, rows = a.value_proj(config)
        linear = layer.get_submodule(name)
        start = 0 if rows is None else rows.start
        weight = linear.weight[start : start + groups * head_dim]
        bias = None if linear.bias is None else linear.bias[start : start + groups * head_dim]
        moments = torch.zeros(groups, head_dim, head_dim, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            normed = self._apply(getattr(layer, a.attn_norm), self.hidden)
            for chunk in normed.reshape(-1, normed.shape[-1]).split(CHUNK_TOKENS):
                v = torch.nn.functional.linear(chunk, weight, bias).reshape(-1, groups, head_dim).double()
                moments += torch.einsum("tgi,tgj->gij", v, v)
        return moments

    def input_moments(self, index: int, tensors: dict[str, torch.Tensor], advance: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``d x d`` float64 sums of ``x^T x`` over the calibration tokens of layer ``index``'s attention
        input and MLP input (``--basis pca``/``pooled``), in the basis the layer's tensors read.

        ``x`` is what the sub-block's linears read: the RMSNorm output, the gain folded into them
        (``tensors`` are folded, not consumed). The attention input is the hidden state the sparse
        model produces here (the upstream layers gated at the target); the layer itself runs dense,
        since its gates are set only once its bases are known. ``advance`` then replaces the hidden
        states by the layer's dense output (a first, dense pass over the model).
        """
        if self.hidden is None:
            raise RuntimeError("Calibrator.embed() must come before the first layer")
        a = self.adapter
        layer, _ = self._build_layer(index, dict(tensors))
        self.rotary = self._rotary(a.layer_type(self.config, index))
        self.mask = self._attention_mask(index)
        with torch.no_grad():
            normed = self._apply(getattr(layer, a.attn_norm), self.hidden)
            attn = _second_moment(normed)
            mid = self._post_norm(layer, a.attn_post_norm, self._attention(layer, normed))
            del normed
            mid += self._residual(layer, "attn_shortcut", self.hidden)
            normed = self._apply(getattr(layer, a.mlp_norm), mid)
            mlp = _second_moment(normed)
            if advance:
                out = self._post_norm(layer, a.mlp_post_norm, self._mlp(layer, normed))
                out += self._residual(layer, "mlp_shortcut", mid)
                self.hidden = out
        return attn, mlp

    def rotate_hidden(self, rotation: torch.Tensor) -> None:
        """Re-express the hidden states in another basis: ``h <- h R`` (``R = A^T B`` from basis ``A`` to ``B``)."""
        r = rotation.to(self.hidden.device, self.hidden.dtype)
        self.hidden = self._apply(lambda x: x @ r, self.hidden)

    def _global_allocation(self) -> None:
        """``--allocation global``: one greedy path over every matrix of every layer (TEAL-greedyopt's idea
        at model scope), replacing each layer's allocation by its columns of the model's.

        Each layer's error curves (its sub-block outputs' squared error with one matrix gated) are
        divided by the energy of the residual stream entering that layer, so that a step's cost is
        a relative perturbation wherever it happens; the rows are then *model* levels (the
        size-weighted mean over the whole model), which the runtime shifts by the model-wide extra
        fraction (``allocation_scope: "model"``). Layers were propagated at the per-layer greedy
        allocation; the quantile tables serve any sparsity, so the thresholds follow the new one.
        """
        curves = [c for layer_curves, _, _ in self.curves for c in layer_curves]
        sizes = torch.cat([s for _, s, _ in self.curves])
        free = torch.cat([f for _, _, f in self.curves])
        alloc = greedy_path(curves, sizes, free)
        column = 0
        for index, (layer_curves, _, _) in enumerate(self.curves):
            self.tensors[f"{self.adapter.layers_prefix}.{index}.allocation"] = alloc[:, column : column + len(layer_curves)].float()
            column += len(layer_curves)

    def _input_groups(self) -> list[tuple[str, ...]]:
        """The gated linears that read one input (and so share its center)."""
        a = self.adapter
        return [a.attn_inputs, (a.attn_output,), a.mlp_inputs, (a.mlp_output,)]

    def _extra_fraction(self, gates: dict[str, GatedLinear]) -> float:
        """Bytes a layer reads beside its gated matrices' kept columns, over the matrices': the two ``d x d``
        shortcut rotations of a transformed layer and the low-rank factors (a center's bias ``W c`` is one
        vector, not counted)."""
        shapes = {name: (g.out_features, g.in_features, len(g.splits)) for name, g in gates.items()}
        return extra_fraction(self.config, shapes, self.transform, self.lowrank) * self.byte_scale

    def _fit_lowrank(self, name: str, gate: GatedLinear, x: torch.Tensor) -> None:
        """Fit ``gate``'s factors on its input ``x`` at its current thresholds (nothing without ``--lowrank``)."""
        rank = self.lowrank.get(name, 0)
        if rank == 0:
            return
        if gate.center is not None:
            x = x - gate.center
        a, b = fit_gate(gate.weight, gate.splits, x, gate.thresholds, rank)
        gate.set_lowrank(a, b)

    def _provisional_lowrank(self, gates: dict[str, GatedLinear], inputs: dict[str, torch.Tensor],
                             quantiles: dict[str, torch.Tensor], level: float) -> None:
        """Factors for the error curves: fitted on the curve tokens with every matrix at the layer's level
        (the allocation is not known yet); the final ones replace them in ``_propagate``."""
        if not self.lowrank or level <= 0:
            return
        for name, gate in gates.items():
            if name in self.lowrank:
                norms = self._norms(gate)
                gate.set_thresholds(torch.stack([thresholds_at(quantiles[name][p], norms[p], min(level, MAX_SPARSITY), self.method)
                                                 for p in range(len(gate.splits))]))
                self._fit_lowrank(name, gate, inputs[name])
                gate.set_thresholds(torch.zeros_like(gate.thresholds))

    def _curve_sample(self) -> torch.Tensor:
        """``[n, w, d]``: the first ``w <= CURVE_WINDOW`` positions of ``n`` samples spread over the set,
        ``n * w ~ CURVE_TOKENS``; the tokens on which allocation error curves are measured."""
        count, length = self.hidden.shape[:2]
        window = min(length, CURVE_WINDOW)
        n = min(count, max(1, CURVE_TOKENS // window))
        index = torch.linspace(0, count - 1, n).round().long().to(self.hidden.device)
        return self.hidden[index, :window]

    def _dense_sample(self, layer: nn.Module, gates: dict[str, GatedLinear], sample: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Dense run of the layer on ``sample``: every gate's input, what the attention and the MLP add to
        the residual (their outputs, through the post-sub-block norms where the family has them), and the
        chunk outputs of the linears that read a sub-block's input (replayed by the error curves)."""
        a = self.adapter
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in (*a.attn_inputs, *a.mlp_inputs) if name in gates}
        handles = [gate.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
                   for name, gate in gates.items()]
        handles += [gates[name].register_forward_hook(lambda m, args, out, name=name: outputs[name].append(out.detach()))
                    for name in outputs]
        for gate in gates.values():
            gate.active = False
        try:
            attn_out = self._post_norm(layer, a.attn_post_norm, self._attention(layer, getattr(layer, a.attn_norm)(sample)))
            mid = self._shortcut(layer, "attn_shortcut", sample) + attn_out
            mlp_out = self._post_norm(layer, a.mlp_post_norm, self._mlp(layer, getattr(layer, a.mlp_norm)(mid)))
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(xs) for name, xs in inputs.items()}, attn_out, mlp_out, outputs

    def _error_curves(self, layer: nn.Module, gates: dict[str, GatedLinear], quantiles: dict[str, torch.Tensor],
                      parts: list[tuple[str, int]], free: torch.Tensor, inputs: dict[str, torch.Tensor],
                      attn_ref: torch.Tensor, mlp_ref: torch.Tensor, outputs: dict[str, list[torch.Tensor]] | None = None
                      ) -> list[list[tuple[float, float]]]:
        """Squared error of what a sub-block adds to the residual with each matrix gated alone, at
        ``GREEDY_GRID`` sparsities.

        Both sub-blocks write into the residual stream, so their errors are in the same units and
        comparable. q/k/v re-run the attention and gate/up the MLP, from their recorded inputs; the
        other (ungated, so unchanged) input linears of that sub-block replay their recorded dense
        ``outputs`` instead of being recomputed (same values, fewer products: k and v are not re-run for
        q's curve, nor up_proj for gate_proj's); o_proj and down_proj are the sub-blocks' last linears, so their error is exactly
        ``W (x - gated(x))``, computed without running anything; where a post-sub-block norm ``n``
        follows them (Gemma) it is ``n(W gated(x)) - n(W x)`` instead, the norm applied to the
        gated output.
        """
        a = self.adapter
        attn_in, mlp_in = inputs[a.attn_inputs[0]], inputs[a.mlp_inputs[0]]
        curves = []
        for (name, p), f in zip(parts, free.tolist()):
            gate = gates[name]
            norms = self._norms(gate)
            start = sum(gate.splits[:p])
            weight = gate.weight[start : start + gate.splits[p]]
            curve = [(f, 0.0)]
            group = a.attn_inputs if name in a.attn_inputs else a.mlp_inputs if name in a.mlp_inputs else ()
            siblings = {n: outputs[n] for n in group if n != name and outputs and outputs.get(n)}
            for s in GREEDY_GRID:
                if s <= f:
                    continue
                t = thresholds_at(quantiles[name][p], norms[p], s, self.method)
                if group:
                    rows = torch.zeros(len(gate.splits), gate.in_features, device=t.device)
                    rows[p] = t
                    gate.set_thresholds(rows)
                    with _replayed(layer, siblings):
                        if name in a.attn_inputs:
                            out = self._post_norm(layer, a.attn_post_norm, self._attention(layer, attn_in))
                            error = (out - attn_ref).float().pow(2).sum()
                        else:
                            out = self._post_norm(layer, a.mlp_post_norm, self._mlp(layer, mlp_in))
                            error = (out - mlp_ref).float().pow(2).sum()
                    gate.active = False
                else:
                    x = inputs[name] if gate.center is None else inputs[name] - gate.center
                    keep = x.abs() > t.to(x.device, x.dtype)
                    post = a.attn_post_norm if name == a.attn_output else a.mlp_post_norm
                    # (with --lowrank, what the factors give back of the dropped part is subtracted from it)
                    term = None if gate.lowrank_a is None else gate.lowrank_term(x, keep.unsqueeze(-2))
                    if post is None:
                        dropped = torch.where(keep, torch.zeros_like(x), x)
                        missing = torch.nn.functional.linear(dropped, weight)
                        error = (missing if term is None else missing - term).float().pow(2).sum()
                    else:
                        ref = attn_ref if name == a.attn_output else mlp_ref
                        gated = x * keep if gate.center is None else x * keep + gate.center
                        y = torch.nn.functional.linear(gated, weight, gate.bias)
                        out = self._post_norm(layer, post, y if term is None else y + term)
                        error = (out - ref).float().pow(2).sum()
                curve.append((s, max(float(error), curve[-1][1])))
            curves.append(curve)
        return curves

    def _gate_at_target(self, gates: dict[str, GatedLinear], names: tuple[str, ...], x: torch.Tensor,
                        sparsities: dict[str, list[float]], quantiles: dict[str, torch.Tensor]) -> None:
        """Measure ``names``' quantiles on their actual input ``x`` and set their thresholds at the target."""
        self._center([gates[n] for n in names], x)
        for n in names:
            quantiles[n] = self._quantiles(gates[n], x)
        self._set({n: gates[n] for n in names}, quantiles, sparsities)
        for n in names:
            self._fit_lowrank(n, gates[n], x)

    def _propagate(self, layer: nn.Module, gates: dict[str, GatedLinear], sparsities: dict[str, list[float]]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The layer's output with every gate at the target, and the quantile tables to store.

        Computed sub-block by sub-block in execution order: each gate's quantiles are measured on
        all calibration tokens of its *actual* input, shaped by the gates upstream of it (in this
        layer and the earlier ones), so that the stored thresholds hit the target on the sparse
        model's activations. A sub-block runs once: its output linear is bypassed to record its
        input, gated from that input's quantiles, then applied.
        """
        a = self.adapter
        quantiles: dict[str, torch.Tensor] = {}
        mid = self._sub_block(layer, gates, sparsities, quantiles, self.hidden, a.attn_norm, a.attn_inputs,
                              a.attn_output, a.attn_post_norm, self._attention, "attn_shortcut")
        # Neither the layer input nor the attention's weights are needed any more: free them
        # before the MLP's activations (167 MB of float32 weights for a Llama-3-8B layer).
        self.hidden = None
        _release(getattr(layer, a.attn_module))
        _release(getattr(layer, "attn_shortcut", None))
        out = self._sub_block(layer, gates, sparsities, quantiles, mid, a.mlp_norm, a.mlp_inputs,
                              a.mlp_output, a.mlp_post_norm, self._mlp, "mlp_shortcut")
        return out, quantiles

    def _sub_block(self, layer: nn.Module, gates: dict[str, GatedLinear], sparsities: dict[str, list[float]],
                   quantiles: dict[str, torch.Tensor], h: torch.Tensor, norm: str, inputs: tuple[str, ...],
                   output: str, post_norm: str | None, run, shortcut: str) -> torch.Tensor:
        """``shortcut(h) + post_norm(block(norm(h)))`` with the block's gates set at the target from their
        actual inputs (no ``post_norm``: the block's output goes straight into the residual)."""
        normed = self._apply(getattr(layer, norm), h)
        self._gate_at_target(gates, inputs, normed, sparsities, quantiles)
        with _bypassed(layer, output) as linear:
            x = run(layer, normed)
        del normed
        self._gate_at_target(gates, (output,), x, sparsities, quantiles)
        out = self._post_norm(layer, post_norm, self._apply(linear, x))
        del x
        out += self._residual(layer, shortcut, h)
        return out

    def _residual(self, layer: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
        """The skip connection's value: ``h``, or ``h`` through the shortcut rotation, chunk by chunk."""
        shortcut = getattr(layer, name, None)
        return h if shortcut is None else self._apply(shortcut, h)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.allocation == "global":
            self._global_allocation()
        by_role = {role: sum(v) / len(v) for role, v in self.report.items()}
        meta = {
            "quantile_levels": QUANTILE_LEVELS.tolist(),
            "allocation_levels": ALLOCATION_LEVELS.tolist(),
            "allocation_scope": "model" if self.allocation == "global" else "layer",
            "calibration": {**self.info, "target_sparsity": self.target, "report": by_role},
        }
        return self.tensors, meta


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t^T x_t`` (``d x d``, float64) over every token of ``x`` ``[..., d]``, chunk by chunk."""
    moments = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    for chunk in x.reshape(-1, x.shape[-1]).split(CHUNK_TOKENS):
        chunk = chunk.double()
        moments.addmm_(chunk.T, chunk)
    return moments


def _release(module: nn.Module | None) -> None:
    """Free the storage of ``module``'s parameters (the module is not run again)."""
    if module is not None:
        for param in module.parameters():
            param.data = param.data.new_empty(0)


