"""``wina_convert.load``: a WINA checkpoint as a real transformers ``PreTrainedModel``, sparse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..arch import Adapter, adapter_for
from ..checkpoint.format import (INDEX, SIDECAR, WinaRecord, base_config, parse_dtype, read_sidecar, read_wina_config,
                                 verify_checkpoint)
from ..errors import WinaError, one_line
from ..gate import column_norms
from ..lowrank import check_factors
from ..progress import quiet_transformers
from ..transform import ATTN_SHORTCUT, MLP_SHORTCUT, has_shortcuts
from .control import GateTable, WinaControl, gate_modules, swap_gated_linears
from .modules import GateContext, GatedLinear, Shortcut, WinaDecoderLayer, wina_model_class
from .quantized import load_quantized
from ..weights import WeightFormat


def wrap_layer(layer: nn.Module, adapter: Adapter, dim: int) -> WinaDecoderLayer:
    ref = next(layer.parameters())
    shortcuts = (Shortcut(dim, device=ref.device, dtype=ref.dtype), Shortcut(dim, device=ref.device, dtype=ref.dtype))
    return WinaDecoderLayer(layer, adapter.layer_names(), shortcuts)


def _read_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name not in weight_map:
            raise WinaError(f"{directory} is missing tensor {name!r}: the checkpoint is incomplete or not from wina-convert")
        by_shard.setdefault(weight_map[name], []).append(name)
    out = {}
    for shard, shard_names in by_shard.items():
        with safe_open(str(directory / shard), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in shard_names})
    return out


def attach_gates(model: nn.Module, adapter: Adapter, config: Any, sidecar: dict[str, torch.Tensor], record: WinaRecord) -> WinaControl:
    """Swap every gated linear for a ``GatedLinear`` and hang the control on ``model.wina``."""
    layers = gate_modules(adapter, config.num_hidden_layers)
    splits = {}
    for layer in range(config.num_hidden_layers):
        for name in adapter.gated_linears():
            full = adapter.layer_key(layer, name)
            splits[full] = adapter.splits(name, config, model.get_submodule(full).out_features)
    gates = swap_gated_linears(model, [n for names in layers for n in names], splits, GateContext())
    tables = {}
    for name, gate in gates.items():
        norms = sidecar.get(f"{name}.column_norms")
        if norms is None or tuple(norms.shape) != (len(gate.splits), gate.in_features):
            raise WinaError(f"the sidecar does not match the weights: column norms of {name} are missing or of the wrong shape")
        tables[name] = GateTable(name, norms.float(), sidecar.get(f"{name}.quantiles"))
        center = sidecar.get(f"{name}.center")
        if center is not None:
            if center.numel() != gate.in_features or not torch.isfinite(center).all():
                raise WinaError(f"the sidecar's center of {name} is invalid (wrong size or not finite)")
            gate.set_center(center.float())
        a, b = sidecar.get(f"{name}.lowrank_a"), sidecar.get(f"{name}.lowrank_b")
        if a is not None or b is not None:
            check_factors(name, a, b, gate.out_features, gate.in_features, len(gate.splits))
            gate.set_lowrank(a.float(), b.float())
    if record.head is not None:  # the output head's gate (convert --head-sparsity)
        head_gate(model, adapter, gates, tables, record.head, sidecar.get(f"{record.head}.column_norms"),
                  sidecar.get(f"{record.head}.quantiles"))
    allocation = [sidecar.get(f"{adapter.layers_prefix}.{layer}.allocation") for layer in range(config.num_hidden_layers)]
    control = WinaControl(gates, tables, allocation, layers, record)
    control.layers_prefix = adapter.layers_prefix
    control.watch_padding(model)
    model.wina = control
    return control


def head_gate(model: nn.Module, adapter: Adapter, gates: dict[str, GatedLinear], tables: dict[str, GateTable], head: str,
              norms: torch.Tensor | None, quantiles: torch.Tensor | None) -> None:
    """Swap the output head ``head`` for a ``GatedLinear`` (in ``gates``, sharing their context) with its table."""
    module = model.get_submodule(head) if head == adapter.lm_head.removesuffix(".weight") else None
    if module is None or norms is None or quantiles is None or tuple(norms.shape) != (1, module.in_features):
        raise WinaError(f"the sidecar does not match the weights: the output head's gate ({head}) is missing or of the wrong shape")
    gates.update(swap_gated_linears(model, [head], {head: [module.out_features]}, next(iter(gates.values())).context))
    tables[head] = GateTable(head, norms.float(), quantiles)


def check_sidecar(control: WinaControl, record: WinaRecord, num_layers: int) -> None:
    """Refuse a sidecar that was edited by hand or belongs to other weights."""
    if record.num_layers != num_layers:
        raise WinaError(f"the sidecar is for {record.num_layers} layers but the weights have {num_layers}")
    for name, gate in control.gates.items():
        table = control.tables[name]
        actual = column_norms(gate.weight.detach(), gate.splits)
        if not torch.allclose(actual.cpu(), table.column_norms, rtol=1e-2, atol=1e-3):
            raise WinaError(f"the sidecar does not match the weights: column norms of {name} differ (edited or from another model)")
        q = table.quantiles
        if q is not None and (not torch.isfinite(q).all() or (q.diff(dim=-1) < 0).any() or (q < 0).any()):
            raise WinaError(f"the sidecar's quantile table of {name} is invalid (not finite, negative or decreasing)")
    for layer, alloc in enumerate(control.allocation):
        if alloc is not None and (not torch.isfinite(alloc).all() or (alloc < 0).any() or (alloc > 1).any()):
            raise WinaError(f"the sidecar's allocation of layer {layer} is invalid (values must be in [0, 1])")


def load(
    model: str | Path,
    sparsity: float | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    gate_prefill: bool = False,
    revision: str | None = None,
    token: str | None = None,
    kernels: bool = True,
    compile: bool = False,
    head_sparsity: float | None = None,
) -> Any:
    """Load a WINA checkpoint (directory or Hub id) as a transformers model, gated at ``sparsity``.

    ``sparsity=None`` uses the calibrated target; any value in [0, 0.9] is derived from the
    sidecar's quantile tables; 0 runs dense. ``gate_prefill`` decides whether prompt tokens are
    gated too (decode tokens always are); off by default: a prompt is one compute-bound forward, where
    skipping columns saves no time (benchmarks/results/prefill_cpu.md), and a dense prompt keeps its keys
    and values exact. On CUDA with triton the gated linears use the sparse
    kernels for one-token decode steps, which ``model.generate`` replays from CUDA graphs with a
    static KV cache (``runtime/graphs.py``; the weights of q/k/v and gate/up are then stored once,
    packed as ``W^T``, a transformed model's shortcut rotations are packed into those launches, and a
    model on SDPA attention switches to ``"wina_sdpa"``: one triton launch per layer for the attention of
    a decode step, ``runtime/kernels/attention.py``);
    ``kernels=False`` keeps the masking reference. ``compile=True`` records the
    ``torch.compile``'d decode step instead of the eager one (a minute or more to compile an 8B model,
    ~1.3x faster per token on an H100: benchmarks/results/decode_h100_modes.md). ``head_sparsity`` gates
    the output head at that fraction of its columns (None: the checkpoint's ``--head-sparsity``, 0: dense).
    """
    directory = _resolve(model, revision, token)
    config_dict = read_wina_config(directory)
    verify_checkpoint(directory, hashes=False)  # sizes of all files, sha256 of the small ones
    sidecar, record = read_sidecar(directory / SIDECAR)
    for written in (WinaRecord.from_dict(config_dict["wina"], f"{directory}/config.json"), record):
        WeightFormat.from_dict(written.weights)  # a weight scheme this version does not know, in either place: refused
    hf_model = assemble(config_dict, sidecar, record, directory, dtype=dtype)
    hf_model.wina.set_gate_prefill(gate_prefill)
    return activate(hf_model, sparsity, device=device, kernels=kernels, compile=compile, head_sparsity=head_sparsity)


def assemble(config_dict: dict[str, Any], sidecar: dict[str, torch.Tensor], record: WinaRecord,
             weights: Path | dict[str, torch.Tensor], *, dtype: str | torch.dtype | None = None) -> Any:
    """The transformers model of a WINA checkpoint, its gates attached (dense, on the CPU, in eval mode).

    ``weights`` is the checkpoint's directory, or its tensors by name (``wina convert`` searches the model it
    has just written without reading it back).
    """
    config = base_config(config_dict)
    adapter = adapter_for(config.model_type)
    adapter.check(config)
    if record.transform and adapter.transform_refusal:
        raise WinaError(f"cannot load a transformed checkpoint: {adapter.transform_refusal}")
    causal_lm = wina_model_class(adapter.model_classes()[0])  # its save_pretrained writes a WINA checkpoint
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    in_memory = isinstance(weights, dict)
    with quiet_transformers():
        try:
            if in_memory:
                hf_model = causal_lm.from_pretrained(None, config=config, state_dict=weights, dtype=torch_dtype or "auto")
            else:
                hf_model = causal_lm.from_pretrained(weights, config=config, dtype=torch_dtype or "auto")
        except (OSError, ValueError, RuntimeError) as e:
            raise WinaError(f"cannot load the weights of {'the model' if in_memory else weights}: {one_line(e)[:300]}") from e
    load_quantized(hf_model, weights, record)  # convert --weights: the dequantized weights, and gl.quant
    if has_shortcuts(record.to_dict()):
        names = [f"{adapter.layers_prefix}.{i}.{s}" for i in range(config.num_hidden_layers) for s in (ATTN_SHORTCUT, MLP_SHORTCUT)]
        _install_shortcuts(hf_model, adapter, config, {n: weights[n] for n in names} if in_memory else _read_tensors(weights, names))
    control = attach_gates(hf_model, adapter, config, sidecar, record)
    check_sidecar(control, record, config.num_hidden_layers)
    control.checkpoint_config = config_dict
    hf_model.eval()
    return hf_model


def activate(hf_model: Any, sparsity: float | None = None, *, device: str | torch.device = "cpu", kernels: bool = True,
             compile: bool = False, head_sparsity: float | None = None) -> Any:
    """Move an assembled model to ``device``, gate it at ``sparsity`` and bind the GPU kernels (``load``'s options)."""
    control = hf_model.wina
    hf_model.to(device)
    control.set_sparsity(sparsity)
    if head_sparsity is not None:
        control.set_head_sparsity(head_sparsity)
    if kernels:
        from .graphs import enable_decode_graphs
        from .kernels.hook import enable_kernels, fuse_shortcuts, input_groups

        adapter = adapter_for(hf_model.config.model_type)
        if enable_kernels(control, input_groups(adapter, hf_model.config.num_hidden_layers)):
            from .kernels.attention import enable as enable_decode_attention

            fuse_shortcuts(hf_model.get_submodule(adapter.layers_prefix), adapter)
            enable_decode_attention(hf_model)
            enable_decode_graphs(hf_model, control.gates.values(), compile=compile)
    return hf_model


def _install_shortcuts(model: nn.Module, adapter: Adapter, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    layers = model.get_submodule(adapter.layers_prefix)
    for i in range(config.num_hidden_layers):
        wrapped = wrap_layer(layers[i], adapter, config.hidden_size)
        dtype = wrapped.attn_shortcut.weight.dtype
        with torch.no_grad():
            wrapped.attn_shortcut.weight.copy_(tensors[f"{adapter.layers_prefix}.{i}.{ATTN_SHORTCUT}"].to(dtype))
            wrapped.mlp_shortcut.weight.copy_(tensors[f"{adapter.layers_prefix}.{i}.{MLP_SHORTCUT}"].to(dtype))
        layers[i] = wrapped


def _resolve(model: str | Path, revision: str | None, token: str | None) -> Path:
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise WinaError(f"no such checkpoint directory: {model}")
    from ..hub.download import resolve_model

    return resolve_model(str(model), revision=revision, token=token, purpose="load")
