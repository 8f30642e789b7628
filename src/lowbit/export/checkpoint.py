"""lowbit's own checkpoint: a directory that loads back into the same model, bit for bit.

    config.json        the Hugging Face model config (architecture)
    tokenizer files    as the tokenizer saves them
    model.safetensors  for each quantized Linear NAME: NAME.qweight, NAME.scales, [NAME.zeros], [NAME.bias]
                       (layouts in lowbit.formats.intq); every other tensor under its usual name, once
                       (tied weights are stored once and listed under "tied")
    lowbit.json        format version, versions, base model, dtype, the scheme of every quantized module,
                       the recipe and the settings used
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .. import __version__
from ..errors import LowbitError
from ..formats import QuantizedTensor, spec_from_dict
from ..models.arch import arch_for
from ..models.sources import Loaded, _no_init, check_safetensors, hf_config_dict, read_config, unique_state_dict
from ..formats.act import ActSpec
from ..nn import QuantLinear, set_submodule
from ..nn.qlinear import ACT_STATE_KEYS
from .atomic import atomic_dir

FORMAT = "lowbit"
FORMAT_VERSION = 1


def save_checkpoint(model: torch.nn.Module, tokenizer, out: str | Path, *, base: str | None = None,
                    overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a quantized (or float) model as a lowbit checkpoint; the directory appears only when complete."""
    from safetensors.torch import save_file
    import transformers

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors, tied = unique_state_dict(model)
    for name, mod in quantized.items():
        for key, t in {**mod.quantized_tensor().tensors(), **mod.act_state()}.items():
            tensors[f"{name}.{key}"] = t.contiguous()
    record = dict(getattr(model, "lowbit", {}))
    record.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "machine": platform.machine(),
        "base": base or record.get("base"),
        "tied": tied,
        "modules": {n: {**record.get("modules", {}).get(n, {}), **m.spec.to_dict(),
                        "act": None if m.act is None else m.act.to_dict()} for n, m in quantized.items()},
        **(extra or {}),
    })
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "lowbit"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "lowbit.json").write_text(json.dumps(record, indent=2, default=str))
    return Path(out)


def read_record(path: Path) -> dict:
    try:
        record = json.loads((path / "lowbit.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"corrupt lowbit.json in {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LowbitError(f"{path}/lowbit.json is not a lowbit checkpoint record")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit (format {record['format_version']})")
    return record


def load_checkpoint(path: str | Path, kernel: str = "auto") -> Loaded:
    """Rebuild the model a lowbit checkpoint describes; its logits equal the saved model's exactly."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    record = read_record(path)
    arch_for(read_config(path))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LowbitError(f"{path} has no model.safetensors")
    check_safetensors(weights)
    dtype = getattr(torch, record.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(str(path))
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        for name, info in record.get("modules", {}).items():
            spec = spec_from_dict(info)
            linear = model.get_submodule(name)
            stored = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "scales", "zeros") if f"{name}.{k}" in names}
            if "qweight" not in stored:
                raise LowbitError(f"{weights} lacks the tensors of quantized module {name}")
            qt = QuantizedTensor(spec, (linear.out_features, linear.in_features), stored["qweight"],
                                 stored.get("scales"), stored.get("zeros")).validate(name)
            bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
            act_state = {k: f.get_tensor(f"{name}.{k}") for k in ACT_STATE_KEYS if f"{name}.{k}" in names}
            names -= {f"{name}.{k}" for k in (*stored, *act_state, "bias")}
            act = ActSpec.from_dict(info.get("act"))
            if act is not None and act.static and "act_scale" not in act_state:
                raise LowbitError(f"{weights} lacks the static activation scale of {name}")
            set_submodule(model, name, QuantLinear(qt, bias, kernel=info.get("kernel", "auto") if kernel == "auto"
                                                   else kernel, act=act, act_state=act_state))
        rest = {k: f.get_tensor(k) for k in names}
    tied = record.get("tied", {})
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LowbitError(f"{weights} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for alias, target in tied.items():
        parent, _, leaf = alias.rpartition(".")
        tparent, _, tleaf = target.rpartition(".")
        setattr(model.get_submodule(parent), leaf, getattr(model.get_submodule(tparent), tleaf))
    model.eval()
    model.lowbit = record
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    return Loaded(model, tokenizer, str(path))
