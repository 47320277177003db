"""The independent reference the runtime is checked against: a plain transformers model of the base architecture,
gated by forward hooks written here from the checkpoint's files (not from the runtime's code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

# Gated linears of a layer in execution order, with the row counts of their stacked matrices.
LLAMA_GATES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PHI3_GATES = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]


def sidecar_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(directory / "wina.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["wina"])


def checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("model-*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _splits(name: str, weight: torch.Tensor, config) -> list[int]:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if name.endswith("qkv_proj"):
        return [config.num_attention_heads * head, config.num_key_value_heads * head, config.num_key_value_heads * head]
    if name.endswith("gate_up_proj"):
        return [config.intermediate_size] * 2
    return [weight.shape[0]]


def reference_model(directory: Path, sparsity: float):
    """A plain transformers model of the base architecture, gated by hooks written here.

    Thresholds are derived independently of the runtime: per-gate sparsity from the sidecar's
    allocation (numpy interpolation), the score quantile at that sparsity, divided by the column norms
    from the sidecar (checked against the weights). Transformed checkpoints get their residual rotations from a
    decoder-layer wrapper written here too.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((directory / "config.json").read_text())
    wina = raw.pop("wina")
    for key in ("model_type", "architectures", "dtype", "torch_dtype"):
        raw.pop(key, None)
    config = AutoConfig.for_model(wina["base_model_type"], **raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    weights = checkpoint_weights(directory)
    shortcuts = {k: v for k, v in weights.items() if "shortcut" in k}
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in shortcuts}, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    sidecar, meta = sidecar_tensors(directory)
    q_levels, a_levels = np.array(meta["quantile_levels"]), np.array(meta["allocation_levels"])
    gates = PHI3_GATES if wina["base_model_type"] == "phi3" else LLAMA_GATES
    head_level, offset, scale = _head_plan(model, meta, sparsity, gates)
    for i, layer in enumerate(model.model.layers):
        alloc = sidecar[f"model.layers.{i}.allocation"].double().numpy()
        # sparsity counts bytes: a transformed layer's matrices also pay for its two d x d shortcuts
        extra = 2 * config.hidden_size**2 / sum(layer.get_submodule(n).weight.numel() for n in gates) if wina["transform"] else 0.0
        assert meta["extra_fraction"][i] == pytest.approx(extra)
        # an in-budget head: the layers give up what it skips (times the measured level scale)
        level = min(max(0.0, (sparsity + extra - offset) * scale), 0.9) if sparsity > 0 else 0.0
        column = 0
        for name in gates:
            full = f"model.layers.{i}.{name}"
            linear = layer.get_submodule(name)
            splits = _splits(name, linear.weight, config)
            thresholds, start = [], 0
            for p, rows in enumerate(splits):
                s = float(np.interp(level, a_levels, alloc[:, column]))
                t = float(np.interp(s, q_levels, sidecar[f"{full}.quantiles"][p].double().numpy())) if s > 0 else 0.0
                # float32 like the runtime: calibration scores tie exactly with repeated tokens' inputs
                norms = sidecar[f"{full}.column_norms"][p].float()
                assert torch.allclose(norms, linear.weight[start : start + rows].float().norm(dim=0), rtol=1e-4)
                thr = torch.full_like(norms, t) if meta["method"] == "teal" else t / norms
                thresholds.append(torch.where(norms > 0, thr, torch.full_like(thr, float("inf"))) if t > 0 else torch.zeros_like(norms))
                start += rows
                column += 1

            def masked(module, args, output, thresholds=thresholds, splits=splits):
                x = args[0]
                outs, start = [], 0
                for thr, rows in zip(thresholds, splits):
                    bias = None if module.bias is None else module.bias[start : start + rows]
                    keep = x.abs() > thr
                    outs.append(F.linear(x * keep, module.weight[start : start + rows], bias))
                    start += rows
                return torch.cat(outs, dim=-1)

            linear.register_forward_hook(masked)
        if shortcuts:
            layer.forward = _rotating_forward(layer, shortcuts[f"model.layers.{i}.attn_shortcut.weight"],
                                              shortcuts[f"model.layers.{i}.mlp_shortcut.weight"])
    if head_level > 0:
        head = model.get_submodule(meta["head"])
        norms = sidecar[f"{meta['head']}.column_norms"][0].float()
        assert torch.allclose(norms, head.weight.float().norm(dim=0), rtol=1e-4)
        t = float(np.interp(head_level, q_levels, sidecar[f"{meta['head']}.quantiles"][0].double().numpy()))
        thr = torch.full_like(norms, t) if meta["method"] == "teal" else t / norms

        def masked_head(module, args, output, thr=thr):
            x = args[0]
            return F.linear(x * (x.abs() > thr), module.weight, module.bias)

        head.register_forward_hook(masked_head)
    return model


def _head_plan(model, meta: dict, sparsity: float, gates: list[str]) -> tuple[float, float, float]:
    """The output head's level at ``sparsity``, and what the layers give up for it: (head level, offset, scale).

    A head on top (``--head-sparsity H``) skips ``H`` and costs the layers nothing; an in-budget head
    (``auto``, a searched share ``r``) skips ``r * sparsity`` of its columns, and the layers' level falls by those
    columns' share of the gated matrices' parameters, then is multiplied by the recorded level scale.
    """
    if not meta.get("head") or sparsity <= 0:
        return 0.0, 0.0, 1.0
    if meta.get("head_share") is None:
        return float(meta["head_sparsity"]), 0.0, 1.0
    level = min(meta["head_share"] * sparsity, 0.9)
    gated = sum(layer.get_submodule(n).weight.numel() for layer in model.model.layers for n in gates)
    return level, level * model.get_submodule(meta["head"]).weight.numel() / gated, float(meta["head_level_scale"])


def _rotating_forward(layer, attn_rotation: torch.Tensor, mlp_rotation: torch.Tensor):
    def forward(hidden_states, **kwargs):
        residual = hidden_states @ attn_rotation.T
        attn = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + (attn[0] if isinstance(attn, tuple) else attn)
        residual = hidden_states @ mlp_rotation.T
        return residual + layer.mlp(layer.post_attention_layernorm(hidden_states))

    return forward
