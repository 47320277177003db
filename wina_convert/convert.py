"""``wina convert``: read a model, transform it layer by layer, calibrate, write a WINA checkpoint.

The recipe streams: one decoder layer is in memory at a time (plus the two tensors of the next
one that give its attention basis); it is read, transformed in float64 block by block on the
device, cast to the output dtype, written to the current shard at once, handed to the calibrator
(which propagates the calibration hidden states through it) and dropped. Peak memory is one layer
and the calibration activations, not the model. ``--basis pca`` keeps one more matrix (the last
layer's down_proj, written once the next basis is measured); ``--basis pooled`` reads the model twice
(a dense pass for the basis, then the conversion).
"""

from __future__ import annotations

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
from .checkpoint.format import (FORMAT_VERSION, SIDECAR, TOKENIZER_FILES, WINA_MODEL_TYPE, parse_dtype, write_manifest,
                                write_sidecar)
from .checkpoint.source import Source, open_source, weights_sha256
from .checkpoint.writer import OutputDir, ShardWriter
from .defaults import DEFAULTS, SEARCH_TOKENS
from .errors import WinaError
from .gate import MAX_SPARSITY, column_norms
from .hub.card import write_model_card
from .lowrank import check_ranks, extra_fraction, parse_ranks
from .progress import Reporter
from .transform import (BASES, MLP_SHORTCUT, attention_basis, moment_basis, rotate_embedding, rotate_head, rotate_outputs,
                        rotate_value_heads, shortcut_rotation, transform_layer, value_head_bases)
from .units import parse_size
from .version import __version__


HEAD_TOKENS = 2048  # calibration tokens (whole windows) the output head's gate is calibrated on (--head-sparsity)


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


def output_config(source: Source, adapter: Adapter, out_dtype: torch.dtype, transform: bool, wina: dict[str, Any]) -> dict[str, Any]:
    config = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        config.pop(key, None)
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    wina["base_model_type"] = config["model_type"]
    wina["base_architectures"] = config.get("architectures") or [type(source.config).__name__.replace("Config", "ForCausalLM")]
    if transform:
        config["tie_word_embeddings"] = False
        config["model_type"] = WINA_MODEL_TYPE
        config["architectures"] = ["WinaConvertForCausalLM"]
    config["wina"] = wina
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
    device: str = "cpu",
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
    quiet: bool = False,
    reporter: Reporter | None = None,
) -> ConvertResult:
    """Convert ``model`` (Hub id, local directory or .gguf) into a WINA checkpoint at ``output``.

    See README.md for the output format. Returns where it wrote, how long it took and what.
    """
    start = time.perf_counter()
    _check_sparsity(sparsity)
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
    if not calibrate and (center != "none" or head_bases != "none"):
        raise WinaError("--center and --head-bases are measured on calibration text: drop --no-calibrate")
    _check_basis(basis, transform, calibrate)
    head_sparsity = _check_head_sparsity(head_sparsity, calibrate)
    head_auto = head_sparsity == "auto"
    if head_auto and sparsity <= 0:
        head_sparsity, head_auto = 0.0, False  # nothing to share at sparsity 0
    shortcuts = transform and basis != "pooled"
    torch_device = _device(device)
    shard_bytes = parse_size(shard_size)
    target = Path(output).expanduser()
    local = Path(os.path.expanduser(str(model)))
    out_dir = OutputDir(target, overwrite=overwrite, protected=[local] if local.exists() else [])
    reporter = reporter or Reporter(quiet=quiet)
    clock = StageClock(torch_device)

    t0 = time.perf_counter()
    source = open_source(model, revision=revision, token=token)
    out_dir.protect([*source.origin, *source.files.values()])  # a Hub snapshot is known only now
    config = source.config
    adapter = adapter_for(config.model_type)
    adapter.check(config)
    if transform and adapter.transform_refusal:
        raise WinaError(adapter.transform_refusal)
    check_shapes(adapter, config, source.names, lambda name: source.tensor(name).shape)
    ranks = parse_ranks(lowrank, adapter.gated_linears())
    if any(ranks.values()):
        if not calibrate:
            raise WinaError("--lowrank fits its factors on calibration text: drop --no-calibrate")
        check_ranks(ranks, _gated_shapes(source, adapter, config))
    fingerprint = None
    if source.base.get("sha256") is None and source.base.get("revision") is None and source.files:
        # A local directory is identified by the hash of its weights, computed while we work.
        hasher = ThreadPoolExecutor(1)
        fingerprint = hasher.submit(weights_sha256, list(source.files.values()))
        hasher.shutdown(wait=False)
    out_dtype = parse_dtype(dtype) or source.dtype
    calibrator = None
    if calibrate:
        tokens, cal_info = load_calibration_tokens(source, calibration, samples=samples, seq_len=seq_len, seed=seed,
                                                   device=torch_device)
        calibrator = Calibrator(config, adapter, tokens, transform=shortcuts, method=method,
                                allocation="greedy" if allocation == "output" else allocation,
                                target=sparsity, device=torch_device, dtype=out_dtype, info=cal_info,
                                center=center, head_bases=head_bases, lowrank=ranks)
    clock.seconds["setup"] = time.perf_counter() - t0
    if out_dir.stale:
        reporter.log(f"[yellow]removing an interrupted conversion: {', '.join(p.name for p in out_dir.stale)}[/]")

    with reporter.running(), out_dir as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        sidecar: dict[str, torch.Tensor] = {}
        extra: list[float] = []  # per layer: bytes read densely beside the gated matrices, over theirs
        count = config.num_hidden_layers
        reporter.stage("transform" if transform else "copy", count)
        q_attn = None
        identity = torch.eye(config.hidden_size, dtype=torch.float64, device=torch_device)
        if transform and basis == "svd":
            with clock("read"):
                ahead = _layer_tensors(source, adapter, 0, _attention_basis_names(adapter, config))
            with clock("transform"):
                q_attn = attention_basis(ahead, adapter, config, torch_device)
        elif basis == "pooled":  # calibrator is set: checked above
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
            if basis == "pca":
                with clock("calibrate"):
                    q_attn, q_mlp = _pca_bases(calibrator, layer, tensors, adapter, config, stream, out_dtype)
                with clock("write"):
                    if layer == 0:
                        writer.add(adapter.embed, rotate_embedding(source.tensor(adapter.embed), q_attn, out_dtype))
                    for name, tensor in _finish_output(pending, adapter, q_attn, out_dtype).items():
                        writer.add(f"{adapter.layers_prefix}.{layer - 1}.{name}", tensor)
                last = layer + 1 == count
                # Until the next layer's basis is measured on this layer's output, the MLP writes in its
                # own basis (an identity mlp_shortcut): gating does not depend on the output basis.
                pending = {} if last else {**{k: t for k, t in tensors.items() if k.startswith(f"{adapter.mlp_output}.")},
                                           "q_mlp": q_mlp}
                stream = q_mlp
            deferred = {*pending, MLP_SHORTCUT} if pending else set()
            with clock("transform"):
                if basis == "pca":
                    final = transform_layer(tensors, adapter, config, q_attn, identity if last else q_mlp, out_dtype,
                                            q_mlp=q_mlp)
                elif basis == "pooled":
                    final = transform_layer(tensors, adapter, config, q_attn, q_attn, out_dtype, q_mlp=q_attn,
                                            shortcuts=False)
                elif transform:
                    q_next = attention_basis(ahead, adapter, config, torch_device) if layer + 1 < count else identity
                    final = transform_layer(tensors, adapter, config, q_attn, q_next, out_dtype)
                    q_attn = q_next
                else:
                    final = {name: t.to(torch_device, out_dtype) for name, t in tensors.items()}
                del tensors
                if head_bases == "pca":  # calibrator is set: checked above
                    final = rotate_value_heads(final, adapter, config, value_head_bases(calibrator.value_moments(layer, final)))
                splits = {n: adapter.splits(n, config, final[f"{n}.weight"].shape[0]) for n in adapter.gated_linears()}
                shapes = {n: (*final[f"{n}.weight"].shape, len(splits[n])) for n in splits}
                extra.append(extra_fraction(config, shapes, shortcuts, ranks))
                for name in splits:
                    sidecar[f"{prefix}{name}.column_norms"] = column_norms(final[f"{name}.weight"], splits[name]).cpu()
            with clock("write"):
                for name, tensor in final.items():
                    if name not in deferred:
                        writer.add(prefix + name, tensor)
            if calibrator is not None:
                with clock("calibrate"):
                    calibrator.layer(layer, final)  # empties final: the writer is done with it
            del final
            _release_memory()
            reporter.advance()
        t3 = time.perf_counter()
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
        shards = writer.finish()
        meta: dict[str, Any] = {
            "method": method,
            "transform": transform,
            "basis": basis,
            "num_layers": config.num_hidden_layers,
            "target_sparsity": sparsity if calibrator is not None else 0.0,
            "budget": "bytes",
            "extra_fraction": extra,
        }
        if any(ranks.values()):
            meta["lowrank"] = {n: r for n, r in ranks.items() if r}
        if calibrator is not None:
            cal_tensors, cal_meta = calibrator.finish()
            sidecar.update(cal_tensors)
            meta.update(cal_meta)
        write_sidecar(tmp / SIDECAR, sidecar, meta)
        if fingerprint is not None:
            source.base["sha256"] = fingerprint.result()
        wina = {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "method": method,
            "transform": transform,
            "target_sparsity": meta["target_sparsity"],
            "budget": "bytes",  # --sparsity is the fraction of the gated sub-blocks' decode bytes skipped
            "center": center,
            "head_bases": head_bases,
            "basis": basis,
            "lowrank": {n: r for n, r in ranks.items() if r},
            "head_sparsity": "auto" if head_auto else float(head_sparsity),
            "base_model": source.base,
            "license": getattr(config, "license", None),
            "sidecar": SIDECAR,
        }
        if calibrator is not None:
            wina["calibration"] = meta["calibration"]
        (tmp / "config.json").write_text(json.dumps(output_config(source, adapter, out_dtype, transform, wina), indent=2) + "\n")
        _write_tokenizer(source, tmp)
        write_model_card(tmp)
        write_manifest(tmp, writer.sha256)
        clock.seconds["write"] = clock.seconds.get("write", 0.0) + time.perf_counter() - t3
        def rewritten() -> None:  # the sidecar changed: the config, card and manifest follow it
            (tmp / "config.json").write_text(json.dumps(output_config(source, adapter, out_dtype, transform, wina), indent=2) + "\n")
            write_model_card(tmp)
            write_manifest(tmp, writer.sha256)

        if allocation == "output" and calibrator is not None and sparsity > 0:  # else there is nothing to search
            reporter.stage("search", 1)
            with clock("search"):
                meta = _search_allocation(tmp, tokens, sparsity, torch_device, sidecar, meta, search_tokens)
            wina["calibration"] = meta["calibration"]
            rewritten()
            reporter.advance()
        if head_auto or head_sparsity > 0:
            reporter.stage("head", 2 if head_auto else 1)
            head = adapter.lm_head.removesuffix(".weight")
            with clock("calibrate"):
                _calibrate_head(tmp, tokens, sparsity, torch_device, sidecar, meta, HEAD_TOKENS, head,
                                0.0 if head_auto else head_sparsity)
            rewritten()
            reporter.advance()
            if head_auto:
                with clock("search"):
                    meta = _search_head_share(tmp, tokens, sparsity, torch_device, sidecar, meta, search_tokens)
                    rewritten()
                    if meta["head_share"] > 0:  # the head's input, with the layers at their final level
                        _calibrate_head(tmp, tokens, sparsity, torch_device, sidecar, meta, HEAD_TOKENS, head,
                                        meta["head_sparsity"])
                        rewritten()
                        meta = _fit_head_scale(tmp, tokens, sparsity, torch_device, sidecar, meta, search_tokens)
                wina.update(calibration=meta["calibration"], head_sparsity=meta["head_sparsity"], head_share=meta["head_share"])
                reporter.advance()
            rewritten()
    total_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return ConvertResult(target, time.perf_counter() - start, total_bytes, clock.seconds,
                         meta.get("calibration") if calibrator is not None else None)


def _search_allocation(directory: Path, tokens: torch.Tensor, sparsity: float, device: torch.device,
                       sidecar: dict[str, torch.Tensor], meta: dict[str, Any], search_tokens: int) -> dict[str, Any]:
    """``--allocation output``: load the checkpoint written so far, search its layers' levels by the model's
    loss on calibration text (``calibration/search.py``), and rewrite its sidecar with the result."""
    from .calibration.search import search_layer_levels
    from .runtime.load import load

    model = load(directory, sparsity, device=device, kernels=False, gate_prefill=True)
    prefix = model.wina.layers_prefix
    allocation, report = search_layer_levels(model, tokens, sparsity, prefix, search_tokens)
    del model
    for layer, alloc in enumerate(allocation):
        sidecar[f"{prefix}.{layer}.allocation"] = alloc
    by_role = report.pop("by_role")
    calibration = {**meta["calibration"], "allocation": "output", "search": report, "report": by_role}
    meta = {**meta, "allocation_scope": "model", "calibration": calibration}
    write_sidecar(directory / SIDECAR, sidecar, meta)
    return meta


def _calibrate_head(directory: Path, tokens: torch.Tensor, sparsity: float, device: torch.device,
                    sidecar: dict[str, torch.Tensor], meta: dict[str, Any], max_tokens: int, head: str,
                    head_sparsity: float) -> None:
    """``--head-sparsity``: the output head's gate, calibrated like a layer's (score quantiles of ``|x_i| c_i``) on
    the final hidden states of the checkpoint written so far, gated at its target with its final allocation
    (whole windows, at least ``max_tokens`` tokens); the sidecar (and ``meta``) are rewritten with it."""
    from .gate import score_quantiles
    from .runtime.load import load

    model = load(directory, sparsity, device=device, kernels=False, gate_prefill=True)
    weight = model.get_submodule(head).weight
    norms = column_norms(weight.detach(), [weight.shape[0]]).cpu()
    rows = max(1, min(len(tokens), -(-max_tokens // tokens.shape[1])))
    hidden = []
    with torch.no_grad():
        for start in range(0, rows, 4):
            out = model.get_decoder()(input_ids=tokens[start : min(start + 4, rows)].to(device))
            hidden.append(out.last_hidden_state.reshape(-1, weight.shape[1]).float())
    del model
    x = torch.cat(hidden)
    sidecar[f"{head}.column_norms"] = norms
    sidecar[f"{head}.quantiles"] = score_quantiles(x, norms[0] if meta["method"] == "wina" else None,
                                                   torch.Generator().manual_seed(0))[None].float()
    meta.update(head=head, head_sparsity=float(head_sparsity))
    write_sidecar(directory / SIDECAR, sidecar, meta)


def _search_head_share(directory: Path, tokens: torch.Tensor, sparsity: float, device: torch.device,
                       sidecar: dict[str, torch.Tensor], meta: dict[str, Any], search_tokens: int) -> dict[str, Any]:
    """``--head-sparsity auto``: choose the head's share of the target's bytes (``calibration/search.py``) on the
    checkpoint written so far (its head gate calibrated) and record it in the sidecar (``meta["head_share"]``)."""
    from .calibration.search import search_head_share
    from .runtime.load import load

    model = load(directory, sparsity, device=device, kernels=False, gate_prefill=True)
    share, report = search_head_share(model, tokens, sparsity, model.wina.layers_prefix, search_tokens)
    del model
    meta = {**meta, "head_share": share, "head_sparsity": min(share * sparsity, MAX_SPARSITY), "head_level_scale": report["level_scale"],
            "calibration": {**meta["calibration"], "head": report}}
    write_sidecar(directory / SIDECAR, sidecar, meta)
    return meta


def _fit_head_scale(directory: Path, tokens: torch.Tensor, sparsity: float, device: torch.device,
                    sidecar: dict[str, torch.Tensor], meta: dict[str, Any], search_tokens: int) -> dict[str, Any]:
    """The layers' level scale fitted again with the head's final gate (the search's was fitted with the head
    calibrated for layers at the target, which skips less once they are lower); the sidecar is rewritten."""
    from .calibration.search import fit_head_level_scale
    from .runtime.load import load

    model = load(directory, sparsity, device=device, kernels=False, gate_prefill=True)
    scale, trail = fit_head_level_scale(model, tokens, sparsity, model.wina.layers_prefix, search_tokens)
    del model
    report = {**meta["calibration"]["head"], "level_scale": round(scale, 5), "skipped_final_gate": trail}
    meta = {**meta, "head_level_scale": scale, "calibration": {**meta["calibration"], "head": report}}
    write_sidecar(directory / SIDECAR, sidecar, meta)
    return meta


def _check_head_sparsity(head_sparsity: Any, calibrate: bool) -> float | str:
    """``--head-sparsity``: a fraction, or ``auto`` (the head's share of the budget searched); returns it. Without
    calibration ``auto`` is a dense head (there is nothing to search on); a fraction is refused."""
    if head_sparsity == "auto" and not calibrate:
        return 0.0
    if head_sparsity != "auto":
        _check_sparsity(head_sparsity, "--head-sparsity")
        head_sparsity = float(head_sparsity)
    if head_sparsity != 0 and not calibrate:
        raise WinaError("--head-sparsity calibrates the head's gate on calibration text: drop --no-calibrate")
    return head_sparsity


def _check_basis(basis: str, transform: bool, calibrate: bool) -> None:
    if basis not in BASES:
        raise WinaError(f"unknown basis {basis!r}: use {', '.join(BASES)}")
    if basis != "svd" and not transform:
        raise WinaError(f"--basis {basis} chooses the transform's bases: add --transform")
    if basis != "svd" and not calibrate:
        raise WinaError(f"--basis {basis} is measured on calibration text: drop --no-calibrate")


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


def _check_sparsity(sparsity: Any, option: str = "--sparsity") -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity <= MAX_SPARSITY:
        raise WinaError(f"{option} must be a number in [0, {MAX_SPARSITY}], got {sparsity!r}")


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WinaError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WinaError("--device cuda was asked for, but no CUDA GPU is available")
    return dev
