"""A GGUF file run as it is stored: its block-format weights kept as their bytes, on lowbit's kernels.

    load_model("model-Q4_K_M.gguf", gguf="blocks")     (lowbit generate does this for a GGUF file)

`load_model(path.gguf)` alone gives a float model (transformers dequantizes every tensor), which is what quality
is measured on. Here each weight the file stores in a GGUF block type lowbit has a format for (formats.gguf:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K) becomes a QuantLinear over exactly those bytes, and a quantized
token embedding a QuantEmbedding; a tied lm_head (no `output` tensor in the file) is a QuantLinear over the
embedding's very tensors. So resident weights are the file's blocks, as in llama.cpp, and writing the model as
GGUF again gives the same tensor bytes (tests).

How a tensor is matched to its module: the model is the float one transformers builds from the file (from
lowbit's float copy of it when cached), and each of its Linear / Embedding weights is named in the file by
gguf's tensor-name map, as the writer (export.gguf) names it. For architectures whose attn_q / attn_k rows
llama.cpp keeps in its rotary order (`ROTARY_PERMUTED`), the stored rows are taken back to transformers' order,
whole rows at a time. Every kept tensor is then checked against the float model: decoded, it must equal the
float weight bit for bit (the whole tensor: about 0.2 s for the default model's). A tensor that fails (a
transform of the architecture this does not model), a type without a lowbit format (the IQ types, for
instance) or a float type stays a float weight; the loaded model's `lowbit["kept_float"]` lists each with the
reason.

`open_gguf` is how lowbit opens any GGUF file it loads (gguf-py's reader, the file checked, one error line).

Memory: the float model is built first and its weights are dropped as they are replaced, so the peak is the
float model's size plus the file's (fine for the models this runs on CPU; a meta-device build would avoid it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..formats import GGUF_TYPES, GGUFSpec, QuantizedTensor
from ..nn import QuantEmbedding, QuantLinear
from ..nn.surgery import set_submodule
from .arch import arch_for
from .hf import Loaded

ROTARY_PERMUTED = ("llama",)   # GGUF architectures whose attn_q / attn_k rows are in llama.cpp's rotary order


def rotary_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that takes transformers' q/k rows (per head: first halves, then second halves of the rotary
    pairs) to llama.cpp's (per head: the two halves interleaved): llama.cpp's row i is transformers' row
    rotary_rows(...)[i]. Its inverse (argsort) is what transformers applies when it loads a llama GGUF."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def rotary_heads(gguf_name: str, config) -> int | None:
    """The head count whose rotary order the rows of this GGUF tensor follow, or None when they are as stored
    (every tensor but attn_q / attn_k of a `ROTARY_PERMUTED` architecture)."""
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return config.num_attention_heads
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return config.num_key_value_heads
    return None


def model_arch(name: str):
    """gguf's MODEL_ARCH member for an architecture name as GGUF files write it (general.architecture)."""
    import gguf
    for arch, n in gguf.MODEL_ARCH_NAMES.items():
        if n == name:
            return arch
    raise LowbitError(f"the gguf package does not know the architecture {name!r}")


def open_gguf(path: str | Path):
    """gguf-py's reader of the GGUF file at `path` and its architecture name (general.architecture), every
    tensor's data checked to lie within the file; a damaged file is one LowbitError."""
    from ..io.gguf_reader import open_reader
    try:
        reader = open_reader(str(path))
        arch = reader.fields["general.architecture"]
        name = bytes(arch.parts[arch.data[0]]).decode()
        for t in reader.tensors:  # touching each tensor's data checks that the file covers it
            _ = t.data.shape
    except Exception as e:   # the reader raises many types for a damaged file
        raise LowbitError(f"corrupt or truncated GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return reader, name


def _stored(t, rows_order: torch.Tensor | None) -> QuantizedTensor:
    """A GGUF tensor of a block type as a lowbit QuantizedTensor (its bytes copied out of the mapped file)."""
    n, k = int(t.shape[1]), int(t.shape[0])   # gguf lists dimensions innermost first
    q = torch.from_numpy(t.data.copy()).reshape(n, -1)
    if rows_order is not None:
        q = q[rows_order]
    return QuantizedTensor(GGUFSpec(t.tensor_type.name), (n, k), q.contiguous()).validate(t.name)


def keep_blocks(loaded: Loaded, path: str | Path, kernel: str = "auto") -> Loaded:
    """Replace the float weights of `loaded` (the model transformers built from the GGUF file at `path`) by the
    file's block-format tensors, where they decode to exactly those weights. Returns `loaded`, changed."""
    import gguf
    path = Path(path)
    model = loaded.model
    reader, gguf_arch = open_gguf(path)
    arch = arch_for(model.config)
    n_blocks = len(model.get_submodule(arch.blocks))
    names = gguf.get_tensor_name_map(model_arch(gguf_arch), n_blocks)
    tensors = {t.name: t for t in reader.tensors}
    kept_float: dict[str, str] = {}
    types: dict[str, str] = {}
    embed_qt = None
    modules = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    # the embedding first: a tied lm_head reuses its tensor
    modules.sort(key=lambda nm: nm[0] != arch.embed)
    tied_head = model.get_submodule(arch.lm_head).weight is model.get_submodule(arch.embed).weight
    for name, mod in modules:
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        t = tensors.get(gname) if gname is not None else None
        if t is None and name == arch.lm_head and tied_head and embed_qt is not None:
            set_submodule(model, name, QuantLinear(embed_qt, mod.bias, kernel=kernel))
            types[name] = embed_qt.spec.type
            continue
        if t is None:
            kept_float[name] = "no tensor of that name in the file"
            continue
        ttype = t.tensor_type.name
        if ttype not in GGUF_TYPES:
            kept_float[name] = f"{ttype} (a float type)" if ttype in ("F32", "F16", "BF16") else \
                f"{ttype} (no lowbit format for it)"
            continue
        heads = rotary_heads(gname, model.config) if gguf_arch in ROTARY_PERMUTED else None
        order = None if heads is None else torch.argsort(rotary_rows(int(t.shape[1]), heads))
        qt = _stored(t, order)
        weight = mod.weight.detach()
        if qt.shape != tuple(weight.shape):
            kept_float[name] = f"its shape {list(qt.shape)} is not the module's {list(weight.shape)}"
            continue
        if not torch.equal(qt.dequantize(torch.float32), weight.float()):
            kept_float[name] = "its rows do not decode to the model's weight (a transform lowbit does not model)"
            continue
        if isinstance(mod, nn.Embedding):
            set_submodule(model, name, QuantEmbedding(qt, mod.padding_idx, weight.dtype))
            embed_qt = qt
        else:
            set_submodule(model, name, QuantLinear(qt, mod.bias, kernel=kernel))
        types[name] = qt.spec.type
    if not types:
        raise LowbitError(f"{path} stores no weight in a block type lowbit runs (its weights are float, or in types "
                          f"lowbit has no format for: {', '.join(sorted(set(kept_float.values()))[:3])})")
    model.lowbit = {"format": "gguf", "base": None, "source": str(path), "gguf_types": types,
                    "kept_float": kept_float}
    return loaded
