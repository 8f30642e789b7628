"""lowbit's own checkpoint: a directory that loads back into the same model, bit for bit.

    config.json        the Hugging Face model config (architecture)
    tokenizer files    as the tokenizer saves them
    model.safetensors  for each quantized Linear NAME: NAME.qweight, NAME.scales, [NAME.zeros], [NAME.bias]
                       (layouts in lowbit.formats.intq); every other tensor under its usual name, once
                       (tied weights are stored once and listed under "tied")
                       -- or, when written block by block (lowbit.offload.quantize_streamed), several
                       shards and model.safetensors.index.json mapping each tensor name to its shard
    lowbit.json        format version, versions, base model, dtype, the scheme of every quantized module,
                       the recipe and the settings used
"""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path

import torch

from .. import __version__
from ..errors import LowbitError
from ..formats import QuantizedTensor, spec_from_dict
from ..formats.act import ActSpec
from ..io.atomic import atomic_dir
from ..io.safetensors import INDEX, check_safetensors, read_index, write_safetensors
from ..models.arch import arch_for
from ..models.moe import unstack_experts
from ..models.hf import Loaded, hf_config_dict, read_config, unique_state_dict
from ..nn import QuantLinear
from ..nn.qlinear import ACT_STATE_KEYS
from ..nn.surgery import meta_tensor_names, rebuild_meta_buffers, set_submodule, tie_tensor

FORMAT = "lowbit"
FORMAT_VERSION = 1
RECORD = "lowbit.json"


def checkpoint_tensors(module: torch.nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a checkpoint stores for `module` (names prefixed), and the tied aliases among them."""
    tensors, tied = unique_state_dict(module)
    for name, mod in module.named_modules():
        if isinstance(mod, QuantLinear):
            for key, t in {**mod.quantized_tensor().tensors(), **mod.act_state()}.items():
                tensors[f"{name}.{key}"] = t.contiguous()
    return ({prefix + k: v for k, v in tensors.items()},
            {prefix + k: prefix + v for k, v in tied.items()})


def checkpoint_record(model: torch.nn.Module, base: str | None, tied: dict, extra: dict | None = None) -> dict:
    import transformers
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
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
    return record


def _finish_dir(tmp: Path, model, tokenizer, record: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))


def save_checkpoint(model: torch.nn.Module, tokenizer, out: str | Path, *, base: str | None = None,
                    overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a quantized (or float) model as a lowbit checkpoint; the directory appears only when complete."""
    tensors, tied = checkpoint_tensors(model)
    record = checkpoint_record(model, base, tied, extra)
    with atomic_dir(out, overwrite) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors")
        _finish_dir(tmp, model, tokenizer, record)
    return Path(out)


class ShardedCheckpointWriter:
    """A checkpoint written piece by piece (one shard per decoder block, then the rest), for models that are
    never in memory whole. Nothing appears at `out` unless `finish` completes; `abort` removes the pieces."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self._ctx = atomic_dir(out, overwrite)
        self.tmp = self._ctx.__enter__()
        self.weight_map: dict[str, str] = {}
        self.tied: dict[str, str] = {}
        self.out = Path(out)

    def add(self, shard: str, tensors: dict[str, torch.Tensor], tied: dict[str, str] | None = None) -> None:
        write_safetensors(tensors, self.tmp / shard)
        self.weight_map.update({k: shard for k in tensors})
        self.tied.update(tied or {})

    def finish(self, model, tokenizer, rest: dict[str, torch.Tensor], base: str | None = None,
               extra: dict | None = None) -> Path:
        self.add("model-rest.safetensors", rest)
        record = checkpoint_record(model, base, self.tied, extra)
        (self.tmp / INDEX).write_text(json.dumps({"weight_map": self.weight_map}, indent=1))
        _finish_dir(self.tmp, model, tokenizer, record)
        self._ctx.__exit__(None, None, None)
        return self.out

    def abort(self, exc: BaseException | None = None) -> None:
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)


class _Tensors:
    """The stored tensors of a checkpoint, in one file or in shards listed by an index."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open
        where = read_index(path)   # shards confined to the checkpoint's directory
        if where is None and not (path / "model.safetensors").is_file():
            raise LowbitError(f"{path} has no model.safetensors")
        self.name = str(path / ("model.safetensors" if where is None else INDEX))
        files = sorted(set(where.values())) if where else [path / "model.safetensors"]
        self.handles = {}
        for f in files:
            if not f.is_file():
                raise LowbitError(f"{path} lacks the shard {f.name}")
            check_safetensors(f)
            self.handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
        if where is None:
            where = {k: files[0] for k in self.handles[files[0]].keys()}
        self.where = where

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def read_record(path: Path) -> dict:
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"corrupt lowbit.json in {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LowbitError(f"{path}/lowbit.json is not a lowbit checkpoint record")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LowbitError(f"{path}/lowbit.json: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit (format {record['format_version']})")
    return record


UNQUANTIZED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _module_entry(model: torch.nn.Module, name, info, where: Path):
    """A recorded quantized module, checked: its name is a Linear of this model, its format a known one."""
    if not isinstance(name, str) or not isinstance(info, dict):
        raise LowbitError(f"{where}: bad entry for module {name!r}")
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"{where} names module {name!r}, which this model does not have") from None
    if not isinstance(linear, torch.nn.Linear):
        raise LowbitError(f"{where} names module {name!r}, which is a {type(linear).__name__}, not a Linear")
    try:
        return spec_from_dict(info), linear
    except (KeyError, TypeError, ValueError) as e:
        raise LowbitError(f"{where}: bad format for module {name}: {e!r}") from None


def load_checkpoint(path: str | Path, kernel: str = "auto") -> Loaded:
    """Rebuild the model a lowbit checkpoint describes; its logits equal the saved model's exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    record = read_record(path)
    arch_for(read_config(path))
    dtype = record.get("dtype", "float32")
    if dtype not in UNQUANTIZED_DTYPES:   # a name from the file: never looked up as an arbitrary attribute
        raise LowbitError(f"{path / RECORD}: dtype {dtype!r} is not one of {', '.join(UNQUANTIZED_DTYPES)}")
    dtype = UNQUANTIZED_DTYPES[dtype]
    config = AutoConfig.from_pretrained(str(path))
    # built on the meta device: no float weights are ever allocated for modules that are stored quantized
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if record.get("unstacked_experts"):   # quantized experts are stored one Linear each (models.moe)
        unstack_experts(model)
    with contextlib.ExitStack() as stack:
        f = _Tensors(path, stack)
        weights = f.name
        names = f.keys()
        modules = record.get("modules", {})
        if not isinstance(modules, dict):
            raise LowbitError(f"{path / RECORD}: 'modules' must be a table of module name -> format")
        for name, info in modules.items():
            spec, linear = _module_entry(model, name, info, path / RECORD)
            stored = {k: f.get(f"{name}.{k}") for k in ("qweight", "scales", "zeros") if f"{name}.{k}" in names}
            if "qweight" not in stored:
                raise LowbitError(f"{weights} lacks the tensors of quantized module {name}")
            qt = QuantizedTensor(spec, (linear.out_features, linear.in_features), stored["qweight"],
                                 stored.get("scales"), stored.get("zeros")).validate(name)
            bias = f.get(f"{name}.bias") if f"{name}.bias" in names else None
            act_state = {k: f.get(f"{name}.{k}") for k in ACT_STATE_KEYS if f"{name}.{k}" in names}
            names -= {f"{name}.{k}" for k in (*stored, *act_state, "bias")}
            act = ActSpec.from_dict(info.get("act"))
            if act is not None and act.static and "act_scale" not in act_state:
                raise LowbitError(f"{weights} lacks the static activation scale of {name}")
            set_submodule(model, name, QuantLinear(qt, bias, kernel=info.get("kernel", "auto") if kernel == "auto"
                                                   else kernel, act=act, act_state=act_state))
        rest = {k: f.get(k) for k in names}
    tied = record.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise LowbitError(f"{path / RECORD}: 'tied' must be a table of tensor name -> tensor name")
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in modules]   # set above
    if missing or unexpected:
        raise LowbitError(f"{weights} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for alias, target in tied.items():
        try:
            tie_tensor(model, alias, target)
        except (AttributeError, TypeError, ValueError, KeyError):   # names from the file, not tensors of this model
            raise LowbitError(f"{path / RECORD} ties {alias} to {target}, which this model does not have") from None
    rebuild_meta_buffers(model, config)
    left = meta_tensor_names(model)
    if left:
        raise LowbitError(f"{path} does not store {', '.join(left[:3])}")
    model.eval()
    model.lowbit = record
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    return Loaded(model, tokenizer, str(path))
