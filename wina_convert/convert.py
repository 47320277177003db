"""``wina convert``: read a model, transform it layer by layer, calibrate, search, write a WINA checkpoint.

The recipe (``convert``): check every option (``Plan``); open the model; stream its layers: one decoder
layer is in memory at a time (plus the two tensors of the next one that give its attention basis); it is
read, transformed in float64 block by block on the device, cast to the output dtype, written to the current
shard at once, handed to the calibrator (which propagates the calibration hidden states through it) and
dropped. Then the searches run on the converted model, built once in memory from the tensors just written
(the layers' levels, the output head's gate), and the sidecar, config, tokenizer, card and manifest are
written, each once. ``--basis pca`` keeps one more matrix (the last layer's down_proj, written once the next
basis is measured); ``--basis pooled`` reads the model twice (a dense pass for the basis, then the conversion).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .arch import Adapter, adapter_for
from .arch.base import check_shapes
from .calibration.calibrator import Calibrator, load_calibration_tokens
from .calibration.head import gate_head
from .calibration.search import search_layers
from .checkpoint.format import (SIDECAR, TOKENIZER_FILES, WINA_MODEL_TYPE, WinaRecord, parse_dtype, write_manifest,
                                write_sidecar)
from .checkpoint.source import Source, open_source, weights_sha256
from .checkpoint.writer import OutputDir, ShardWriter
from .defaults import DEFAULTS, SEARCH_TOKENS
from .errors import WinaError
from .gate import column_norms, fraction
from .hub.card import write_model_card
from .lowrank import check_ranks, extra_fraction, parse_ranks
from .progress import Reporter
from .transform import (BASES, MLP_SHORTCUT, attention_basis, moment_basis, rotate_embedding, rotate_head, rotate_outputs,
                        rotate_value_heads, shortcut_rotation, transform_layer, value_head_bases)
from .units import parse_size
from .weights import QuantizeStage, WeightFormat, parse_weights, quantize_stage


@dataclass
class ConvertResult:
    output: Path
    seconds: float
    bytes_written: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None


def _layer_tensors(source: Source, adapter: Adapter, layer: int, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s tensors as stored (names relative to the layer), or just those in ``only``."""
    prefix = f"{adapter.layers_prefix}.{layer}."
    names = [n for n in source.names if n.startswith(prefix) and (only is None or n[len(prefix):] in only)]
    if not names:
        raise WinaError(f"the weights have no layer {layer}, but the config says {source.config.num_hidden_layers}: config and weights do not match")
    return {n[len(prefix):]: source.tensor(n) for n in names}


def _attention_basis_names(adapter: Adapter, config: Any) -> tuple[str, ...]:
    """The two tensors of a layer that its attention basis needs (read one layer ahead)."""
    return (f"{adapter.attn_basis(config)[0]}.weight", f"{adapter.attn_norm}.weight")


class StageClock:
    """Seconds spent in each stage of the conversion, summed over layers.

    On a GPU, work is queued: the clock waits for the device when a stage ends, so that each
    stage is charged with its own kernels.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, fragmented by per-layer tensors).

    Without this, resident memory creeps up layer after layer although nothing is kept: a
    16-layer conversion ends ~200 MB above where it began, all of it free-but-retained heap.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def output_config(source: Source, adapter: Adapter, out_dtype: torch.dtype, transform: bool, record: WinaRecord) -> dict[str, Any]:
    """config.json: the base model's config, its dtype, and the record as the ``wina`` block (a transformed model
    under ``model_type: wina-convert``, which plain transformers refuses)."""
    config = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        config.pop(key, None)
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    if transform:
        config["tie_word_embeddings"] = False
    if transform or WeightFormat.from_dict(record.weights).quantized:  # plain transformers must refuse it
        config["model_type"] = WINA_MODEL_TYPE
        config["architectures"] = ["WinaConvertForCausalLM"]
    config["wina"] = record.to_dict()
    return config


def _write_tokenizer(source: Source, directory: Path) -> None:
    tok = source.tokenizer_source
    if isinstance(tok, Path):
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                (directory / name).write_bytes((tok / name).read_bytes())
    elif tok is not None:
        tok.save_pretrained(directory)
    if source.generation_config is not None:
        source.generation_config.save_pretrained(directory)


@dataclass
class Plan:
    """Every option of a conversion, checked once (each by one rule) before any work starts."""

    sparsity: float
    transform: bool
    calibrate: bool
    method: str
    allocation: str
    search_tokens: int
    center: str
    head_bases: str
    basis: str
    ranks: dict[str, int]
    head_sparsity: float | str  # a fraction, or "auto": inside the budget, its share searched
    device: torch.device
    weights: WeightFormat  # how the gated matrices are stored (--weights, --group-size)

    @property
    def shortcuts(self) -> bool:
        """The layers store shortcut rotations (transformed, not into one pooled basis)."""
        return self.transform and self.basis != "pooled"

    @property
    def layer_search(self) -> bool:
        return self.calibrate and self.sparsity > 0 and self.allocation == "output"

    @property
    def head_gated(self) -> bool:
        return self.calibrate and (self.head_sparsity == "auto" or self.head_sparsity > 0)

    @property
    def searches(self) -> bool:
        """Whether the converted model is run after the layers are written (the layer search, the head's gate)."""
        return self.layer_search or self.head_gated

    @classmethod
    def check(cls, *, sparsity: Any, transform: bool, calibrate: bool, method: str, allocation: str, search_tokens: Any,
              center: str, head_bases: str, basis: str, lowrank: Any, head_sparsity: Any, device: str | None,
              weights: str | None = None, group_size: int | None = None) -> "Plan":
        sparsity = fraction(sparsity, "--sparsity")
        if method not in ("wina", "teal"):
            raise WinaError(f"unknown method {method!r}: use wina or teal")
        if allocation not in ("uniform", "greedy", "global", "output"):
            raise WinaError(f"unknown allocation {allocation!r}: use uniform, greedy, global or output")
        if isinstance(search_tokens, bool) or not isinstance(search_tokens, int) or search_tokens < 1:
            raise WinaError(f"--search-tokens must be a positive number of tokens, got {search_tokens!r}")
        if center not in ("none", "mean", "median"):
            raise WinaError(f"unknown center {center!r}: use none, mean or median")
        if head_bases not in ("none", "pca"):
            raise WinaError(f"unknown head bases {head_bases!r}: use none or pca")
        if basis not in BASES:
            raise WinaError(f"unknown basis {basis!r}: use {', '.join(BASES)}")
        if basis != "svd" and not transform:
            raise WinaError(f"--basis {basis} chooses the transform's bases: add --transform")
        measured = [name for name, on in (("--center", center != "none"), ("--head-bases", head_bases != "none"),
                                          (f"--basis {basis}", basis != "svd")) if on]
        if head_sparsity != "auto":
            head_sparsity = fraction(head_sparsity, "--head-sparsity")
            if head_sparsity > 0:
                measured.append("--head-sparsity")
        if not calibrate and measured:
            raise WinaError(f"{measured[0]} is measured on calibration text: drop --no-calibrate")
        if not calibrate or sparsity <= 0:  # auto: nothing to search without calibration, nothing to share at 0
            head_sparsity = 0.0 if head_sparsity == "auto" else head_sparsity
        weight_format = parse_weights(weights, group_size)
        if weight_format.quantized and basis == "pca":
            raise WinaError("--basis pca writes each MLP output matrix a layer late, which --weights does not quantize: use --basis svd or pooled")
        return cls(sparsity, transform, calibrate, method, allocation, search_tokens, center, head_bases, basis,
                   {}, head_sparsity, _device(device), weight_format)

    @property
    def rotates(self) -> str | None:
        """The option that rotates the weights (a quantized input's values cannot be kept then), or None."""
        return "--transform" if self.transform else "--head-bases pca" if self.head_bases == "pca" else None


def convert(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    sparsity: float = 0.5,
    transform: bool = DEFAULTS["transform"],
    dtype: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    device: str | None = None,
    calibrate: bool = True,
    calibration: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    allocation: str = DEFAULTS["allocation"],
    search_tokens: int = SEARCH_TOKENS,
    method: str = DEFAULTS["method"],
    center: str = DEFAULTS["center"],
    head_bases: str = DEFAULTS["head_bases"],
    basis: str = DEFAULTS["basis"],
    lowrank: str | int | None = DEFAULTS["lowrank"],
    head_sparsity: float | str = DEFAULTS["head_sparsity"],
    weights: str | None = None,
    group_size: int | None = None,
    quiet: bool = False,
    reporter: Reporter | None = None,
) -> ConvertResult:
    """Convert ``model`` (Hub id, local directory or .gguf) into a WINA checkpoint at ``output``.

    The recipe: check every option; open the model; stream its layers (transform, write the shard,
    calibrate); run the searches on the converted model in memory (the layers' levels, the output head's
    gate); save the sidecar, config, tokenizer, model card and manifest, each once. ``device`` None: cuda
    when present. docs/format.md describes the output. Returns where it wrote, how long it took and what.
    """
    start = time.perf_counter()
    plan = Plan.check(sparsity=sparsity, transform=transform, calibrate=calibrate, method=method, allocation=allocation,
                      search_tokens=search_tokens, center=center, head_bases=head_bases, basis=basis, lowrank=lowrank,
                      head_sparsity=head_sparsity, device=device, weights=weights, group_size=group_size)
    target = Path(output).expanduser()
    local = Path(os.path.expanduser(str(model)))
    out_dir = OutputDir(target, overwrite=overwrite, protected=[local] if local.exists() else [])
    shard_bytes = parse_size(shard_size)
    reporter = reporter or Reporter(quiet=quiet)
    clock = StageClock(plan.device)

    t0 = time.perf_counter()
    if plan.weights.quantized and local.suffix == ".gguf" and local.is_file():  # refused before it is read whole
        from .checkpoint.quantized_source import check_gguf_types

        check_gguf_types(local, plan.weights.bits, plan.rotates)
    opener = None  # --weights: a compressed-tensors directory is opened with its packed values
    if plan.weights.quantized:
        from .checkpoint.quantized_source import open_if_compressed as opener
    source = open_source(model, revision=revision, token=token, quantized=opener)
    out_dir.protect([*source.origin, *source.files.values()])  # a Hub snapshot is known only now
    adapter, config = _checked_model(source, plan, lowrank)
    quantize = quantize_stage(plan.weights, source, adapter, config, _gated_shapes(source, adapter, config), plan.rotates)
    fingerprint = _fingerprint(source)
    out_dtype = parse_dtype(dtype) or source.dtype
    calibrator = tokens = None
    if plan.calibrate:
        tokens, cal_info = load_calibration_tokens(source, calibration, samples=samples, seq_len=seq_len, seed=seed,
                                                   device=plan.device)
        calibrator = Calibrator(config, adapter, tokens, transform=plan.shortcuts, method=plan.method,
                                allocation="greedy" if plan.allocation == "output" else plan.allocation,
                                target=plan.sparsity, device=plan.device, dtype=out_dtype, info=cal_info,
                                center=plan.center, head_bases=plan.head_bases, lowrank=plan.ranks)
    clock.seconds["setup"] = time.perf_counter() - t0
    if out_dir.stale:
        reporter.log(f"[yellow]removing an interrupted conversion: {', '.join(p.name for p in out_dir.stale)}[/]")

    with reporter.running(), out_dir as tmp:
        writer = ShardWriter(tmp, shard_bytes, keep=plan.searches)
        sidecar, extra = _stream_layers(source, adapter, config, plan, out_dtype, writer, calibrator, quantize, clock, reporter)
        with clock("write"):
            writer.finish()
        record = _record(source, plan, extra, calibrator, sidecar, quantize)
        if plan.searches:
            record = _search(source, adapter, plan, record, sidecar, writer.kept, tokens, out_dtype, clock, reporter)
        if fingerprint is not None:
            record.base_model["sha256"] = fingerprint.result()
        with clock("write"):
            _save(tmp, source, adapter, out_dtype, record, sidecar, writer)
    total_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return ConvertResult(target, time.perf_counter() - start, total_bytes, clock.seconds, record.calibration)


def _checked_model(source: Source, plan: Plan, lowrank: Any) -> tuple[Adapter, Any]:
    """The model's adapter and config, refused in one line if the plan cannot apply to it (fills ``plan.ranks``)."""
    config = source.config
    adapter = adapter_for(config.model_type)
    adapter.check(config)
    if plan.transform and adapter.transform_refusal:
        raise WinaError(adapter.transform_refusal)
    check_shapes(adapter, config, source.names, lambda name: source.tensor(name).shape)
    plan.ranks = parse_ranks(lowrank, adapter.gated_linears())
    if any(plan.ranks.values()):
        if not plan.calibrate:
            raise WinaError("--lowrank fits its factors on calibration text: drop --no-calibrate")
        check_ranks(plan.ranks, _gated_shapes(source, adapter, config))
    return adapter, config


def _fingerprint(source: Source) -> Any:
    """A local directory is identified by the hash of its weights, computed in the background while we work."""
    if source.base.get("sha256") is not None or source.base.get("revision") is not None or not source.files:
        return None
    hasher = ThreadPoolExecutor(1)
    future = hasher.submit(weights_sha256, list(source.files.values()))
    hasher.shutdown(wait=False)
    return future


def _stream_layers(source: Source, adapter: Adapter, config: Any, plan: Plan, out_dtype: torch.dtype, writer: ShardWriter,
                   calibrator: Calibrator | None, quantize: QuantizeStage | None, clock: StageClock,
                   reporter: Reporter) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Read, transform, (quantize,) write and calibrate one layer at a time (the embedding first, the final norm and
    head last). With ``--weights`` the gated matrices are quantized right after the transform and the layer keeps
    their dequantized floats: column norms and calibration see the model that runs.

    Returns the sidecar's tensors so far (column norms; the calibrator's come with ``finish``) and, per layer, the
    bytes read densely beside the gated matrices over theirs (``extra_fraction``).
    """
    transform, basis, ranks = plan.transform, plan.basis, plan.ranks
    device = plan.device
    sidecar: dict[str, torch.Tensor] = {}
    extra: list[float] = []
    count = config.num_hidden_layers
    reporter.stage("transform" if transform else "copy", count)
    q_attn = None
    identity = torch.eye(config.hidden_size, dtype=torch.float64, device=device)
    if transform and basis == "svd":
        with clock("read"):
            ahead = _layer_tensors(source, adapter, 0, _attention_basis_names(adapter, config))
        with clock("transform"):
            q_attn = attention_basis(ahead, adapter, config, device)
    elif basis == "pooled":  # calibrator is set: checked by the plan
        with clock("calibrate"):
            q_attn = _pooled_basis(source, adapter, config, calibrator, out_dtype, identity)
    with clock("read"):
        embed = source.tensor(adapter.embed)
    with clock("transform"):
        embed = embed.to(out_dtype) if q_attn is None else rotate_embedding(embed, q_attn, out_dtype)
    if basis != "pca":  # pca: the embedding is written once layer 0's basis is measured
        with clock("write"):
            writer.add(adapter.embed, embed)
    if calibrator is not None:
        with clock("calibrate"):
            calibrator.embed(embed)
    del embed
    pending: dict[str, torch.Tensor] = {}  # pca: the last layer's MLP output, written in the next basis
    stream = identity  # pca: the basis of the calibrator's hidden states
    for layer in range(count):
        prefix = f"{adapter.layers_prefix}.{layer}."
        with clock("read"):
            tensors = _layer_tensors(source, adapter, layer)
            if transform and basis == "svd" and layer + 1 < count:
                ahead = _layer_tensors(source, adapter, layer + 1, _attention_basis_names(adapter, config))
        last = layer + 1 == count
        if basis == "pca":
            with clock("calibrate"):
                q_attn, q_mlp = _pca_bases(calibrator, layer, tensors, adapter, config, stream, out_dtype)
            with clock("write"):
                if layer == 0:
                    writer.add(adapter.embed, rotate_embedding(source.tensor(adapter.embed), q_attn, out_dtype))
                for name, tensor in _finish_output(pending, adapter, q_attn, out_dtype).items():
                    writer.add(f"{adapter.layers_prefix}.{layer - 1}.{name}", tensor)
            # Until the next layer's basis is measured on this layer's output, the MLP writes in its
            # own basis (an identity mlp_shortcut): gating does not depend on the output basis.
            pending = {} if last else {**{k: t for k, t in tensors.items() if k.startswith(f"{adapter.mlp_output}.")},
                                       "q_mlp": q_mlp}
            stream = q_mlp
        deferred = {*pending, MLP_SHORTCUT} if pending else set()
        with clock("transform"):
            if basis == "pca":
                final = transform_layer(tensors, adapter, config, q_attn, identity if last else q_mlp, out_dtype, q_mlp=q_mlp)
            elif basis == "pooled":
                final = transform_layer(tensors, adapter, config, q_attn, q_attn, out_dtype, q_mlp=q_attn, shortcuts=False)
            elif transform:
                q_next = attention_basis(ahead, adapter, config, device) if not last else identity
                final = transform_layer(tensors, adapter, config, q_attn, q_next, out_dtype)
                q_attn = q_next
            else:
                final = {name: t.to(device, out_dtype) for name, t in tensors.items()}
            del tensors
            if plan.head_bases == "pca":  # calibrator is set: checked by the plan
                final = rotate_value_heads(final, adapter, config, value_head_bases(calibrator.value_moments(layer, final)))
            packed = quantize.layer(prefix, final, adapter.gated_linears()) if quantize is not None else {}
            byte_scale = QuantizeStage.byte_scale(final, packed)  # extras are float bytes, the matrices stored ones
            splits = {n: adapter.splits(n, config, final[f"{n}.weight"].shape[0]) for n in adapter.gated_linears()}
            shapes = {n: (*final[f"{n}.weight"].shape, len(splits[n])) for n in splits}
            extra.append(extra_fraction(config, shapes, plan.shortcuts, ranks) * byte_scale)
            for name in splits:
                sidecar[f"{prefix}{name}.column_norms"] = column_norms(final[f"{name}.weight"], splits[name]).cpu()
        with clock("write"):
            for name, tensor in QuantizeStage.stored(final, packed).items():
                if name not in deferred:
                    writer.add(prefix + name, tensor)
        if calibrator is not None:
            with clock("calibrate"):
                calibrator.byte_scale = byte_scale
                calibrator.layer(layer, final)  # empties final: the writer is done with it
        del final
        _release_memory()
        reporter.advance()
    with clock("write"):
        if basis == "pooled":  # lm_head reads the pooled basis: the final norm's gain and Q fold into it
            norm = source.tensor(adapter.final_norm)
            head = source.tensor(adapter.lm_head if source.has(adapter.lm_head) else adapter.embed)
            writer.add(adapter.final_norm, torch.ones(norm.shape, dtype=out_dtype))
            writer.add(adapter.lm_head, rotate_head(head, norm, q_attn, out_dtype))
        else:
            writer.add(adapter.final_norm, source.tensor(adapter.final_norm).to(out_dtype))
            if source.has(adapter.lm_head):
                writer.add(adapter.lm_head, source.tensor(adapter.lm_head).to(out_dtype))
            elif transform:  # tied: the head keeps the original embedding, untied from the rotated one
                writer.add(adapter.lm_head, source.tensor(adapter.embed).to(out_dtype))
    return sidecar, extra


def _record(source: Source, plan: Plan, extra: list[float], calibrator: Calibrator | None,
            sidecar: dict[str, torch.Tensor], quantize: QuantizeStage | None) -> WinaRecord:
    """The checkpoint's record as streamed (before the searches); the calibrator's tables join ``sidecar``."""
    config = source.config
    record = WinaRecord(
        method=plan.method, transform=plan.transform, basis=plan.basis, center=plan.center, head_bases=plan.head_bases,
        lowrank={n: r for n, r in plan.ranks.items() if r}, base_model=dict(source.base),
        base_model_type=config.model_type,
        base_architectures=getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")],
        license=getattr(config, "license", None), num_layers=config.num_hidden_layers,
        target_sparsity=plan.sparsity if calibrator is not None else 0.0, extra_fraction=extra,
        weights=quantize.format.to_dict() if quantize is not None else None,
    )
    if calibrator is not None:
        tables, calibrated = calibrator.finish()
        sidecar.update(tables)
        record = dataclasses.replace(record, **calibrated)
    return record


def _search(source: Source, adapter: Adapter, plan: Plan, record: WinaRecord, sidecar: dict[str, torch.Tensor],
            weights: dict[str, torch.Tensor], tokens: torch.Tensor, dtype: torch.dtype, clock: StageClock,
            reporter: Reporter) -> WinaRecord:
    """The searches, on the converted model in memory (built once from the tensors just written): the layers'
    levels (``--allocation output``), then the output head's gate (``--head-sparsity``). Returns the final record;
    ``sidecar`` gets the tables they add."""
    from .runtime.load import activate, assemble

    config_dict = output_config(source, adapter, dtype, plan.transform, record)
    model = assemble(config_dict, sidecar, record, weights, dtype=dtype)
    model.wina.set_gate_prefill(True)  # the searches judge every calibration position gated
    model = activate(model, plan.sparsity, device=plan.device, kernels=False)
    weights.clear()  # the model holds them now
    if plan.layer_search:
        reporter.stage("layer search", 1)
        with clock("layer search"):
            record = search_layers(model, tokens, plan.sparsity, sidecar, plan.search_tokens)
        reporter.advance()
    if plan.head_gated:
        reporter.stage("head", 1)
        with clock("head"):
            record = gate_head(model, adapter, tokens, plan.sparsity, plan.head_sparsity, sidecar, plan.search_tokens)
        reporter.advance()
    del model
    return record


def _save(directory: Path, source: Source, adapter: Adapter, dtype: torch.dtype, record: WinaRecord,
          sidecar: dict[str, torch.Tensor], writer: ShardWriter) -> None:
    """Write the sidecar, config, tokenizer and model card, then the manifest (last: its presence means complete)."""
    write_sidecar(directory / SIDECAR, sidecar, record)
    config = output_config(source, adapter, dtype, record.transform, record)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(source, directory)
    write_model_card(directory)
    write_manifest(directory, writer.sha256)


def _pca_bases(calibrator: Calibrator, index: int, tensors: dict[str, torch.Tensor], adapter: Adapter, config: Any,
               stream: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``--basis pca``: layer ``index``'s attention and MLP input bases (``d x d``, float64, in the original
    coordinates), the principal axes of its sub-blocks' calibration inputs; the calibrator's hidden
    states, in basis ``stream``, are moved into the attention basis.

    The layer is folded and read in ``stream`` (identity shortcuts) to measure its inputs there: an
    input ``x`` in ``stream`` with principal axes ``V`` (``stream`` coordinates) is ``x V`` in the basis
    ``stream V``.
    """
    provisional = transform_layer(tensors, adapter, config, stream, stream, dtype, q_mlp=stream)
    attn, mlp = calibrator.input_moments(index, provisional)
    del provisional
    v_attn, v_mlp = moment_basis(attn).to(stream.device), moment_basis(mlp).to(stream.device)
    calibrator.rotate_hidden(v_attn)
    return stream @ v_attn, stream @ v_mlp


def _finish_output(pending: dict[str, torch.Tensor], adapter: Adapter, q_next: torch.Tensor,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``--basis pca``: the previous layer's MLP output linear (from its original tensors) and mlp_shortcut,
    now that ``q_next``, the basis its output must be in, is known. Empty before the first layer."""
    q_mlp = pending.pop("q_mlp", None)
    if q_mlp is None:
        return {}
    out = {name: rotate_outputs(tensor, q_next, dtype) for name, tensor in pending.items()}
    out[MLP_SHORTCUT] = shortcut_rotation(q_mlp, q_next).to(dtype)
    return out


def _pooled_basis(source: Source, adapter: Adapter, config: Any, calibrator: Calibrator, dtype: torch.dtype,
                  identity: torch.Tensor) -> torch.Tensor:
    """``--basis pooled``: one residual basis for the whole model, the principal axes of every sub-block's
    normalized input pooled over all layers, from a first, dense pass over the original model (its
    norm gains folded) on the calibration tokens. The calibrator's hidden states are left unset."""
    calibrator.embed(source.tensor(adapter.embed).to(dtype))
    pooled = torch.zeros_like(identity)
    for layer in range(config.num_hidden_layers):
        folded = transform_layer(_layer_tensors(source, adapter, layer), adapter, config, identity, identity, dtype,
                                 q_mlp=identity, shortcuts=calibrator.transform)
        attn, mlp = calibrator.input_moments(layer, folded, advance=True)
        pooled += attn + mlp
        del folded
    calibrator.hidden = None
    return moment_basis(pooled).to(identity.device)


def _gated_shapes(source: Source, adapter: Adapter, config: Any) -> dict[str, tuple[int, int, int]]:
    """``(out, in, stacked matrices)`` of each gated linear of the first layer (every layer has the same)."""
    shapes = {}
    for name in adapter.gated_linears():
        out, inp = source.tensor(f"{adapter.layers_prefix}.0.{name}.weight").shape
        shapes[name] = (out, inp, len(adapter.splits(name, config, out)))
    return shapes


def _device(device: str | None) -> torch.device:
    """``--device``: cuda when present unless told otherwise; cuda asked for without one is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WinaError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WinaError("--device cuda was asked for, but no CUDA GPU is available")
    return dev
