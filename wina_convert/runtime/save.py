"""``model.save_pretrained`` of a loaded WINA model: a complete WINA checkpoint, never a plain one.

transformers' own ``save_pretrained`` would write a transformed model's rotated weights under the base
``model_type``, which plain transformers then loads and runs without the shortcut rotations: silently
another model. It would also drop the weights that share storage with the kernels' packed ``W^T`` (q/k/v,
gate/up on CUDA). So a loaded model's class overrides it (``modules.WinaModelMixin``): the weights go through
``ShardWriter`` tensor by tensor (packed views are written as ordinary tensors, nothing is materialized
twice), the sidecar is the one the model was loaded with, config.json is the checkpoint's own (with
``model_type: "wina-convert"`` when transformed, so plain transformers refuses it) with the current
dtype, and the manifest is written last. The target follows ``--overwrite``'s rules (an empty
directory or an earlier WINA checkpoint; never the directory the model was loaded from).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint.format import SIDECAR, TOKENIZER_FILES, write_manifest, write_sidecar
from ..checkpoint.writer import OutputDir, ShardWriter
from ..errors import WinaError
from ..hub.card import write_model_card
from ..units import parse_size


def save_checkpoint(model: Any, target: Path, *, shard_size: str | int = "5GB") -> Path:
    """Write ``model`` (from ``wina_convert.load``) to ``target`` as a complete WINA checkpoint."""
    control = getattr(model, "wina", None)
    config = getattr(control, "checkpoint_config", None)
    if config is None:
        raise WinaError("this model was not loaded by wina_convert.load: nothing to save as a WINA checkpoint")
    origin = Path(str(getattr(model, "name_or_path", "") or ""))
    protected = [origin] if str(origin) and origin.is_dir() else []
    out = OutputDir(target.expanduser(), overwrite=True, protected=protected)
    dtype = next(model.parameters()).dtype
    with out as tmp:
        writer = ShardWriter(tmp, parse_size(shard_size))
        seen = set()
        quantized = {f"{n}.weight": g.quant for n, g in control.gates.items() if g.quant is not None}  # convert --weights
        for name, tensor in model.state_dict().items():
            if name in quantized:  # its codes, scales and offsets, as loaded (the weight is their dequantization)
                for key, part in quantized[name].tensors(name.removesuffix(".weight")).items():
                    writer.add(key, part)
                continue
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
            if key in seen:  # a tied lm_head: stored once, as the checkpoint had it
                continue
            seen.add(key)
            writer.add(name, tensor)
        writer.finish()
        write_sidecar(tmp / SIDECAR, control.sidecar_tensors(), control.record)
        saved = dict(config, wina=control.record.to_dict())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        saved.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if protected and (origin / name).is_file():
                shutil.copyfile(origin / name, tmp / name)
        write_model_card(tmp)
        write_manifest(tmp, writer.sha256)
    return target
