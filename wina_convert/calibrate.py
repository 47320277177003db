"""Calibration (METHOD.md section 3): score quantiles and per-gate sparsity allocation, layer by layer.

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
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import Adapter
from .errors import WinaError
from .runtime.gating import interp
from .runtime.loading import layer_names, model_classes, quiet_transformers
from .runtime.modules import GatedLinear, Shortcut, WinaDecoderLayer
from .transform import column_norms

QUANTILE_LEVELS = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
ALLOCATION_LEVELS = torch.linspace(0.0, 0.9, 37, dtype=torch.float64)
GREEDY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)
MAX_SCORES = 1 << 18  # scores kept per gate for the quantiles (a uniform subsample)
GREEDY_TOKENS = 512
STATS_TOKENS = 4096  # tokens whose scores give the quantile tables
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512
BUNDLED = Path(__file__).resolve().parent.parent / "calibration" / "train"


# --------------------------------------------------------------------------- calibration text

def _read_texts(spec: str | None) -> tuple[list[str], str]:
    """Documents of a calibration source and its description for the sidecar."""
    if spec is None or spec == "default":
        if not BUNDLED.is_dir():
            raise WinaError(f"the bundled calibration set is missing ({BUNDLED}): reinstall wina-convert or pass --calibration")
        return _read_path(BUNDLED), "bundled:calibration/train"
    if spec.startswith("hf:"):
        return _read_hub_dataset(spec[3:]), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise WinaError(f"calibration text not found: {spec}")
    return _read_path(path), str(path)


def _read_path(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if path.is_file() and path.suffix not in (".txt", ".jsonl"):
        raise WinaError(f"calibration file {path} must be .txt or .jsonl (with a 'text' field)")
    texts = []
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise WinaError(f"calibration file {file} is not UTF-8 text (byte {e.start})") from e
        if file.suffix == ".jsonl":
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise WinaError(f"{file}:{number}: each .jsonl line must be an object with a 'text' field") from e
        else:
            texts.extend(doc for doc in raw.split("\n\n\n") if doc.strip())
    if not texts:
        raise WinaError(f"no calibration text found in {path}")
    return texts


def _read_hub_dataset(spec: str) -> list[str]:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError as e:
        raise WinaError("--calibration hf:... needs the datasets package: pip install datasets") from e
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (offline, missing, bad config)
        raise WinaError(f"cannot load dataset {spec!r}: {' '.join(str(e).split())[:200]}") from e
    if "text" not in data.column_names:
        raise WinaError(f"dataset {spec!r} has no 'text' column")
    return [t for t in data["text"] if t and t.strip()]


def tokenizer_of(source: Any) -> Any:
    from transformers import AutoTokenizer

    tok = source.tokenizer_source
    if isinstance(tok, Path):
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as e:
            raise WinaError(f"cannot load the tokenizer of {tok}: calibration needs one ({' '.join(str(e).split())[:150]})") from e
    if tok is None:
        raise WinaError("the model has no tokenizer: calibration needs one")
    return tok


def token_windows(tokenizer: Any, texts: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[samples, seq_len]`` token windows: documents joined by EOS, cut, shuffled by ``seed``."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    count = len(stream) // seq_len
    if count == 0:
        raise WinaError(f"calibration text too short: {len(stream)} tokens, need at least --seq-len {seq_len}")
    windows = list(range(count))
    random.Random(seed).shuffle(windows)
    chosen = windows[:samples]
    return torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in chosen], dtype=torch.long)


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
        from .selfcal import self_generated_texts

        texts, name = self_generated_texts(source, samples=samples, seq_len=seq_len, seed=seed), "self"
    else:
        texts, name = _read_texts(spec)
    tokens = token_windows(tokenizer_of(source), texts, samples, seq_len, seed)
    info = {"dataset": name, "samples": int(tokens.shape[0]), "seq_len": seq_len, "seed": seed, "tokens": int(tokens.numel())}
    return tokens.to(device), info


# --------------------------------------------------------------------------- scores and quantiles

def score_quantiles(x: torch.Tensor, norms: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Quantiles (at ``QUANTILE_LEVELS``) of ``|x_i| * norms_i`` over tokens and channels."""
    scores = x.reshape(-1, x.shape[-1]).abs().float()
    if norms is not None:
        scores = scores * norms.to(scores.device)
    flat = scores.reshape(-1)
    if flat.numel() > MAX_SCORES:
        flat = flat[torch.randint(flat.numel(), (MAX_SCORES,), generator=generator, device="cpu").to(flat.device)]
    ordered = flat.sort().values
    index = (QUANTILE_LEVELS * (ordered.numel() - 1)).round().long().to(ordered.device)
    return ordered[index].cpu()


def thresholds_at(quantiles: torch.Tensor, norms: torch.Tensor, sparsity: float, method: str) -> torch.Tensor:
    """Per-channel thresholds of one matrix at ``sparsity`` (the runtime's rule)."""
    if sparsity <= 0:
        return torch.zeros_like(norms)
    t = float(interp(sparsity, QUANTILE_LEVELS, quantiles.to(torch.float64)))
    if method == "teal":
        return torch.full_like(norms, t)
    return torch.where(norms > 0, t / norms.clamp_min(1e-30), torch.full_like(norms, float("inf")))


# --------------------------------------------------------------------------- the calibrator

class Calibrator:
    """Consumes converted layers in order; produces the sidecar's quantiles and allocations."""

    def __init__(self, config: Any, adapter: Adapter, tokens: torch.Tensor, *, transform: bool, method: str,
                 allocation: str, target: float, device: torch.device, dtype: torch.dtype, info: dict[str, Any]):
        self.config = config
        self.adapter = adapter
        self.tokens = tokens
        self.transform = transform
        self.method = method
        self.allocation = allocation
        self.target = target
        self.device = device
        self.compute_dtype = torch.float32 if device.type == "cpu" else dtype
        self.info = {**info, "allocation": allocation, "method": method}
        self.generator = torch.Generator().manual_seed(info.get("seed", 0))
        self.hidden: torch.Tensor | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.report: dict[str, list[float]] = {}
        self._config = self._attn_config(config)
        _, self.layer_cls, rotary_cls = model_classes(self._config)
        with torch.device(device):
            rotary = rotary_cls(config=self._config)
        seq = tokens.shape[1]
        position_ids = torch.arange(seq, device=device).unsqueeze(0)
        probe = torch.zeros(1, seq, 1, device=device, dtype=self.compute_dtype)
        cos, sin = rotary(probe, position_ids)
        self.position = {"position_embeddings": (cos, sin), "position_ids": position_ids}

    @staticmethod
    def _attn_config(config: Any) -> Any:
        import copy

        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"
        return config

    def embed(self, embedding: torch.Tensor) -> None:
        self.hidden = embedding.to(self.device, self.compute_dtype)[self.tokens]

    def _build_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, GatedLinear]]:
        with quiet_transformers(), torch.device("meta"):
            layer = self.layer_cls(self._config, index)
        if self.transform:
            dim = self.config.hidden_size
            layer = WinaDecoderLayer(layer, layer_names(self.adapter), (Shortcut(dim, device="meta"), Shortcut(dim, device="meta")))
        state = {k: v.to(self.device, self.compute_dtype) for k, v in tensors.items()}
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

    def _run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        def step(chunk: torch.Tensor, pos: dict[str, Any]) -> torch.Tensor:
            out = layer(chunk, attention_mask=None, **pos)
            return out[0] if isinstance(out, tuple) else out

        with torch.no_grad():
            return self._batched(hidden, step)

    def _collect_inputs(self, layer: nn.Module, gates: dict[str, GatedLinear], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense run of the layer; returns each gate's inputs (subsampled tokens)."""
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
        handles = [gate.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
                   for name, gate in gates.items()]
        try:
            self._run(layer, hidden)
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(xs) for name, xs in inputs.items()}

    def _norms(self, gate: GatedLinear) -> torch.Tensor:
        if not hasattr(gate, "column_norms"):
            gate.column_norms = column_norms(gate.weight.detach(), gate.splits)
        return gate.column_norms

    def _quantiles(self, gate: GatedLinear, x: torch.Tensor) -> torch.Tensor:
        norms = self._norms(gate)
        return torch.stack([score_quantiles(x, None if self.method == "teal" else norms[p], self.generator)
                            for p in range(len(gate.splits))])

    def _set(self, gates: dict[str, GatedLinear], quantiles: dict[str, torch.Tensor], sparsities: dict[str, list[float]]) -> None:
        for name, gate in gates.items():
            norms = self._norms(gate)
            gate.set_thresholds(torch.stack([thresholds_at(quantiles[name][p], norms[p], sparsities[name][p], self.method)
                                             for p in range(len(gate.splits))]))

    def layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.hidden is None:
            raise RuntimeError("Calibrator.embed() must come before the first layer")
        layer, gates = self._build_layer(index, tensors)
        stats = self.hidden[: max(1, STATS_TOKENS // self.hidden.shape[1])]
        inputs = self._collect_inputs(layer, gates, stats)
        quantiles = {name: self._quantiles(gate, inputs[name]) for name, gate in gates.items()}
        del inputs
        parts = [(name, p) for name in gates for p in range(len(gates[name].splits))]
        sizes = torch.tensor([gates[n].splits[p] * gates[n].in_features for n, p in parts], dtype=torch.float64)
        free = torch.tensor([_zero_fraction(quantiles[n][p]) for n, p in parts], dtype=torch.float64)
        if self.allocation == "greedy":
            alloc = greedy_path(self._error_curves(layer, gates, quantiles, parts, free), sizes, free)
        else:
            alloc = uniform_path(len(parts), free, sizes)
        at_target = interp(self.target, ALLOCATION_LEVELS, alloc.T).tolist()
        sparsities: dict[str, list[float]] = {name: [] for name in gates}
        for (name, _), s in zip(parts, at_target):
            sparsities[name].append(s)
        self.hidden = self._propagate(layer, gates, quantiles, sparsities)
        prefix = f"{self.adapter.layers_prefix}.{index}"
        for name, gate in gates.items():
            self.tensors[f"{prefix}.{name}.quantiles"] = quantiles[name].float()
            role = name.rsplit(".", 1)[-1]
            fraction = sum(s * rows for s, rows in zip(sparsities[name], gate.splits)) / sum(gate.splits)
            self.report.setdefault(role, []).append(fraction)
        self.tensors[f"{prefix}.allocation"] = alloc.float()

    def _stage(self, gates: dict[str, GatedLinear], names: tuple[str, ...], quantiles: dict[str, torch.Tensor],
               sparsities: dict[str, list[float]], run, inputs: torch.Tensor) -> torch.Tensor | None:
        """Re-measure ``names``' quantiles on their input as produced by ``run`` (upstream gated), then gate them.

        ``run=None`` means ``inputs`` are the gates' inputs themselves.
        """
        stats = inputs[: max(1, STATS_TOKENS // inputs.shape[1])]
        if run is None:
            for n in names:
                quantiles[n] = self._quantiles(gates[n], stats)
            self._set({n: gates[n] for n in names}, quantiles, sparsities)
            return None
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = [gates[n].register_forward_pre_hook(lambda m, a, n=n: collected[n].append(a[0].detach())) for n in names]
        for n in names:
            gates[n].active = False
        try:
            run(stats)
        finally:
            for h in handles:
                h.remove()
        for n in names:
            quantiles[n] = self._quantiles(gates[n], torch.cat(collected[n]))
        self._set({n: gates[n] for n in names}, quantiles, sparsities)
        return run(inputs)

    def _propagate(self, layer: nn.Module, gates: dict[str, GatedLinear], quantiles: dict[str, torch.Tensor],
                   sparsities: dict[str, list[float]]) -> torch.Tensor:
        """The layer's output with every gate at the target, computed sub-block by sub-block.

        q/k/v read the layer input, so their dense quantiles are final. o_proj, gate/up and
        down_proj re-measure theirs on inputs shaped by the gates upstream of them in the same
        layer, so that the stored thresholds hit the target on the sparse model's activations.
        """
        a = self.adapter
        attn_norm, attn = getattr(layer, a.attn_norm), getattr(layer, a.attn_module)
        mlp_norm, mlp = getattr(layer, a.mlp_norm), getattr(layer, a.mlp_module)
        attn_shortcut = getattr(layer, "attn_shortcut", nn.Identity())
        mlp_shortcut = getattr(layer, "mlp_shortcut", nn.Identity())
        self._set({n: gates[n] for n in a.attn_inputs}, quantiles, sparsities)

        def run_attn(h: torch.Tensor) -> torch.Tensor:
            return self._batched(h, lambda c, pos: attn(hidden_states=attn_norm(c), attention_mask=None, **pos)[0])

        with torch.no_grad():
            attn_out = self._stage(gates, (a.attn_output,), quantiles, sparsities, run_attn, self.hidden)
            mid = attn_shortcut(self.hidden) + attn_out
            del attn_out
            normed = mlp_norm(mid)
            self._stage(gates, a.mlp_inputs, quantiles, sparsities, None, normed)
            mlp_out = self._stage(gates, (a.mlp_output,), quantiles, sparsities,
                                  lambda x: self._batched(x, lambda c, pos: mlp(c)), normed)
            return mlp_shortcut(mid) + mlp_out

    def _batched(self, hidden: torch.Tensor, fn, batch: int = 4) -> torch.Tensor:
        outs = []
        for start in range(0, hidden.shape[0], batch):
            chunk = hidden[start : start + batch]
            cos, sin = self.position["position_embeddings"]
            pos = {"position_embeddings": (cos.expand(chunk.shape[0], -1, -1), sin.expand(chunk.shape[0], -1, -1)),
                   "position_ids": self.position["position_ids"]}
            outs.append(fn(chunk, pos))
        return torch.cat(outs)

    def _error_curves(self, layer: nn.Module, gates: dict[str, GatedLinear], quantiles: dict[str, torch.Tensor],
                      parts: list[tuple[str, int]], free: torch.Tensor) -> list[list[tuple[float, float]]]:
        """Layer-output error of each matrix gated alone, at ``GREEDY_GRID`` sparsities."""
        seqs = max(1, GREEDY_TOKENS // self.hidden.shape[1])
        hidden = self.hidden[:seqs]
        for gate in gates.values():
            gate.active = False
        reference = self._run(layer, hidden)
        curves = []
        for (name, p), f in zip(parts, free.tolist()):
            gate = gates[name]
            norms = self._norms(gate)
            curve = [(f, 0.0)]
            for s in GREEDY_GRID:
                if s <= f:
                    continue
                rows = torch.zeros(len(gate.splits), gate.in_features, device=norms.device)
                rows[p] = thresholds_at(quantiles[name][p], norms[p], s, self.method)
                gate.set_thresholds(rows)
                error = float((self._run(layer, hidden) - reference).float().pow(2).sum())
                curve.append((s, max(error, curve[-1][1])))
            gate.active = False
            curves.append(curve)
        return curves

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        by_role = {role: sum(v) / len(v) for role, v in self.report.items()}
        meta = {
            "quantile_levels": QUANTILE_LEVELS.tolist(),
            "allocation_levels": ALLOCATION_LEVELS.tolist(),
            "calibration": {**self.info, "target_sparsity": self.target, "report": by_role},
        }
        return self.tensors, meta


def _zero_fraction(quantiles: torch.Tensor) -> float:
    """The fraction of scores that are exactly zero: inputs that are skipped for free."""
    zero = (quantiles <= 0).nonzero()
    return float(QUANTILE_LEVELS[int(zero[-1])]) if len(zero) else 0.0


def uniform_path(count: int, free: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Every matrix at the layer's level; matrices with free (all-zero) inputs are credited."""
    levels = ALLOCATION_LEVELS
    rows = []
    for level in levels.tolist():
        # Find the common sparsity u such that the size-weighted mean of max(u, free) is the level.
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            value = float((torch.clamp(free, min=mid) * sizes).sum() / sizes.sum())
            lo, hi = (mid, hi) if value < level else (lo, mid)
        rows.append(torch.clamp(free, min=hi) if level > 0 else torch.zeros(count, dtype=torch.float64))
    return torch.stack(rows)


def greedy_path(curves: list[list[tuple[float, float]]], sizes: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Allocation ``[len(ALLOCATION_LEVELS), matrices]`` from per-matrix error curves.

    Starting from each matrix's free sparsity, repeatedly advance the matrix whose next grid step
    costs the least error per skipped parameter; the layer level (size-weighted mean) rises
    monotonically, and the allocation at each level is interpolated along the path.
    """
    state = free.clone()
    position = [0] * len(curves)
    total = float(sizes.sum())
    path_levels = [float((state * sizes).sum()) / total]
    path_states = [state.clone()]
    while True:
        best, best_cost = None, float("inf")
        for m, curve in enumerate(curves):
            if position[m] + 1 >= len(curve):
                continue
            (s0, e0), (s1, e1) = curve[position[m]], curve[position[m] + 1]
            cost = (e1 - e0) / (float(sizes[m]) * (s1 - s0))
            if cost < best_cost:
                best, best_cost = m, cost
        if best is None:
            break
        position[best] += 1
        state[best] = curves[best][position[best]][0]
        path_levels.append(float((state * sizes).sum()) / total)
        path_states.append(state.clone())
    xs = torch.tensor(path_levels, dtype=torch.float64)
    ys = torch.stack(path_states).T  # [matrices, steps]
    rows = []
    for level in ALLOCATION_LEVELS.tolist():
        if level <= 0:
            rows.append(torch.zeros(len(curves), dtype=torch.float64))
        elif level <= xs[0]:
            rows.append(ys[:, 0].clone())
        else:
            rows.append(interp(level, xs, ys))
    return torch.stack(rows)
