"""Loading quantized checkpoints written by other tools: a Hugging Face directory whose config.json carries a
`quantization_config` of compressed-tensors (pack-quantized, int-quantized, naive-quantized, float-quantized),
GPTQ (v1 `gptq` or `gptq_v2`) or AWQ (GEMM). Their weights stay packed: each quantized Linear becomes a
QuantLinear in lowbit's layout (the format modules in lowbit.export convert exactly, both ways) and runs on
lowbit's kernels. Which modules are quantized is what the files store (a module with the format's tensors);
the quantization_config says with which scheme.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..errors import LowbitError
from ..export import awq, compressed_tensors, gptq
from ..io.safetensors import check_safetensors, read_index
from ..nn import QuantLinear
from ..nn.surgery import meta_tensor_names, rebuild_meta_buffers, set_submodule, tie_tensor
from .arch import arch_for
from .hf import Loaded, read_config

METHODS = ("compressed-tensors", "gptq", "awq")


def foreign_method(path: Path) -> str | None:
    """The quant_method of a directory's quantization_config (None when it has none); an unknown one is an error."""
    cfg = read_config(path)
    q = cfg.get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method not in METHODS:
        raise LowbitError(f"{path}/config.json: unknown quantization_config (quant_method {method!r}); lowbit loads "
                          f"{', '.join(METHODS)}")
    if method == "gptq" and q.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{path}/config.json: GPTQ checkpoint_format {q.get('checkpoint_format')!r} is not "
                          "supported (gptq, gptq_v2)")
    return method


def _open(path: Path, stack: contextlib.ExitStack) -> dict[str, object]:
    """Tensor name -> an open safetensors handle holding it (every shard checked first)."""
    from safetensors import safe_open
    where = read_index(path)
    files = sorted(set(where.values())) if where else sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path} has no safetensors weights")
    handles = {}
    for f in files:
        if not f.is_file():
            raise LowbitError(f"{path} lacks the shard {f.name}")
        check_safetensors(f)
        handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
    if where is None:
        return {k: h for h in handles.values() for k in h.keys()}
    return {k: handles[f] for k, f in where.items()}


def _module_parts(method: str, qcfg: dict, name: str, module, t: dict, shape):
    """(QuantizedTensor, ActSpec or None, activation state) of one stored quantized module."""
    if method == "compressed-tensors":
        found = compressed_tensors.scheme_of_module(qcfg, name, module)
        if found is None:
            raise LowbitError(f"{name} stores quantized tensors but no config group of the quantization_config "
                              "targets it")
        return compressed_tensors.decode(name, t, found[0], found[1], shape)
    if method == "gptq":
        fields = gptq.spec_of_module(qcfg, name)
        if fields is None:
            raise LowbitError(f"{name} stores GPTQ tensors but the quantization_config's dynamic rules exclude it")
        return gptq.decode(name, t, fields, shape, v1=qcfg.get("checkpoint_format", "gptq") == "gptq"), None, {}
    return awq.decode(name, t, qcfg, shape), None, {}


def _warn_once_per_kind(caught) -> None:
    """The format decoders warn per module ("NAME: what happened"); a model has hundreds of modules, so each
    kind of warning is repeated once, with the first module's name and how many more it concerns."""
    kinds: dict[str, list[str]] = {}
    for w in caught:
        name, _, what = str(w.message).partition(": ")
        kinds.setdefault(what or name, []).append(name)
    for what, names in kinds.items():
        more = f" (and {len(names) - 1} more modules)" if len(names) > 1 else ""
        warnings.warn(f"{names[0]}{more}: {what}" if what != names[0] else what, stacklevel=3)


def load_foreign(path: str | Path, dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Loaded:
    """Load a compressed-tensors, GPTQ or AWQ directory into a model with lowbit QuantLinears; what stays
    unquantized gets the dtype its config.json names (else `dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    method = foreign_method(path)
    cfg = read_config(path)
    qcfg = cfg["quantization_config"]
    arch = arch_for(cfg)
    named = cfg.get("dtype") or cfg.get("torch_dtype")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(named, dtype)
    keys = {"compressed-tensors": ("weight_packed", "weight_scale"), "gptq": ("qweight",), "awq": ("qweight",)}[method]
    own = {"compressed-tensors": compressed_tensors.TENSOR_KEYS, "gptq": gptq.TENSOR_KEYS, "awq": awq.TENSOR_KEYS}[method]
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # built as a plain float model; lowbit swaps in its own modules
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = {}
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        where = _open(path, stack)
        names = set(where)
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, torch.nn.Linear) or not any(f"{name}.{k}" in names for k in keys):
                continue
            t = {k: where[f"{name}.{k}"].get_tensor(f"{name}.{k}") for k in own if f"{name}.{k}" in names}
            try:
                qt, act, state = _module_parts(method, qcfg, name, mod, t, (mod.out_features, mod.in_features))
            except KeyError as e:
                raise LowbitError(f"{path}: {name} lacks the tensor {e.args[0]}") from None
            names -= {f"{name}.{k}" for k in t}
            bias = None
            if f"{name}.bias" in names:
                bias = where[f"{name}.bias"].get_tensor(f"{name}.bias").to(dtype)
                names.discard(f"{name}.bias")
            set_submodule(model, name, QuantLinear(qt, bias, kernel=kernel, act=act, act_state=state))
            modules[name] = {**qt.spec.to_dict(), "act": None if act is None else act.to_dict()}
        if not modules:
            raise LowbitError(f"{path} declares {method} quantization but stores no quantized module")
        rest = {k: where[k].get_tensor(k) for k in names}
    _warn_once_per_kind(caught)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False) and f"{arch.lm_head}.weight" in missing
    missing = [k for k in missing if not (tied and k == f"{arch.lm_head}.weight")]
    if missing or unexpected:
        raise LowbitError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        tie_tensor(model, f"{arch.lm_head}.weight", f"{arch.embed}.weight")
    rebuild_meta_buffers(model, config)
    left = meta_tensor_names(model)
    if left:
        raise LowbitError(f"{path} does not store {', '.join(left[:3])}")
    model.eval()
    model.lowbit = {"format": method, "base": None, "modules": modules, "quantization_config": qcfg}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    return Loaded(model, tokenizer, str(path))
