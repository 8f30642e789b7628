"""Writing a model as a GGUF file (llama.cpp's format), on the `gguf` package's GGUFWriter.

    write_gguf(model, "out.gguf", source=...)      the file, published atomically
    gguf_file_bytes(model, source, types)          its exact size in bytes, without writing anything

What goes in the file:
    metadata   from a GGUF source (the default model): every key of the source, in its order, with its type,
               except those that must change: general.file_type (the most common type among the 2-D
               tensors), general.quantization_version, and {arch}.block_count (the model's own; a truncated
               model has fewer blocks). The hyperparameters that shape tensors are checked against the model.
               From a Hugging Face directory (or a lowbit checkpoint, which is one): the keys llama.cpp's
               converter writes for the llama / mistral / qwen2 / qwen3 families (hyperparameters from
               config.json; a byte-level BPE tokenizer from tokenizer.json: tokens, token types, merges,
               special token ids and the chat template through gguf.SpecialVocab).
    tensors    Hugging Face names mapped to GGUF's (token_embd, blk.N.attn_q, ..., output_norm, output) with
               gguf's TensorNameMap. Tensors in a GGUF block format (formats.gguf) are written as their
               stored bytes with their GGML type: lowbit's qweight is GGUF's row layout already. Float tensors:
               1-D (norms, biases) F32 as llama.cpp keeps them, 2-D F16 (F32 with `float_type`). A tied
               lm_head (the very embedding tensor, or a quantized head byte-identical to the quantized
               embedding) is not written: llama.cpp reads `output` from token_embd when it is absent. For
               llama and mistral, llama.cpp keeps the rows of attn_q / attn_k in its own rotary order (pairs
               of halves interleaved per head), while transformers stores (and restores on loading a GGUF)
               the split-halves order; the rows are permuted back here, which for a block format is a
               permutation of whole stored rows.
    layout     header, metadata, tensor infos, then each tensor's data at an offset aligned to
               general.alignment (32 unless the source sets it), each padded to it.

A tensor in a format GGUF has no type for (lowbit's integer groups, FP8, W8A8) is a LowbitError naming the
tensor and the GGUF type of the nearest size at or above its own that fits its rows.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..formats import GGUF_TYPES, GGUFSpec, QuantizedTensor, fallback_type
from ..io.atomic import atomic_file, check_output
from ..models.arch import arch_for
from ..models.gguf_blocks import ROTARY_PERMUTED, model_arch, rotary_heads, rotary_rows
from ..models.hf import Loaded
from ..models.sources import is_lowbit_checkpoint, resolve_source
from ..nn import QuantEmbedding, QuantLinear
from .hf_dir import check_no_input_scales

# model_type -> GGUF architecture (llama.cpp converts Mistral checkpoints to its llama architecture)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FLOAT_TYPES = ("F32", "F16")


@dataclass
class _Entry:
    """One tensor of the file: its GGUF name, type, torch-order shape [rows, cols] (or [n]), and where its
    values come from (a QuantizedTensor or a float tensor; None when only the size is asked for)."""
    name: str
    source: str
    type: str
    shape: tuple[int, ...]
    value: QuantizedTensor | torch.Tensor | None
    rows: torch.Tensor | None = None   # row order to write (the rotary permutation), None for as is

    @property
    def nbytes(self) -> int:
        import gguf
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.type]]
        n = int(np.prod(self.shape))
        return n // block * size

    def array(self) -> np.ndarray:
        v = self.value
        if isinstance(v, QuantizedTensor):
            if self.rows is not None:
                v = v.rows(self.rows)
            return v.qweight.detach().cpu().contiguous().numpy()
        v = v.detach().cpu()
        if self.rows is not None:
            v = v[self.rows]
        out = v.to(torch.float32 if self.type == "F32" else torch.float16)
        if not torch.isfinite(out).all():
            raise LowbitError(f"tensor {self.source} does not fit in {self.type} (its values overflow)")
        return out.contiguous().numpy()


def _model_of(model) -> tuple[torch.nn.Module, str | None]:
    if isinstance(model, Loaded):
        return model.model, model.source
    if not isinstance(model, torch.nn.Module):
        raise LowbitError(f"write_gguf takes a torch model or a Loaded, got {type(model).__name__}")
    return model, None


def _resolve(source, loaded_from: str | None, model) -> Path:
    """The GGUF file or Hugging Face directory that describes the model: `source`, else where the model was
    loaded from, else the base its quantization record names; a lowbit checkpoint stands for its base when that
    is a GGUF file (its own directory is a Hugging Face directory otherwise)."""
    for candidate in (source, loaded_from, getattr(model, "lowbit", {}).get("base")):
        if candidate is None:
            continue
        path = resolve_source(candidate)
        if is_lowbit_checkpoint(path) and source is None:
            base = json.loads((path / "lowbit.json").read_text()).get("base")
            if base is not None:
                try:
                    base_path = resolve_source(base)
                except LowbitError:
                    base_path = None
                if base_path is not None and base_path.is_file():
                    return base_path
        return path
    raise LowbitError("write_gguf needs source=: the GGUF file or Hugging Face directory the model came from "
                      "(its metadata and tokenizer go into the file)")


def _suggest(spec, shape: tuple[int, int]) -> str:
    """The GGUF type with the fewest bits per weight at or above the format's own that fits rows of this
    length (k-quants preferred on ties: they spend their bits better)."""
    k = shape[1]
    bits = spec.bits_per_weight(shape)
    fits = []
    for t in GGUF_TYPES:
        try:
            if fallback_type(t, k) == t:
                fits.append((GGUFSpec(t).bits_per_weight(shape), not t.endswith("_K"), t))
        except LowbitError:
            continue
    above = [f for f in fits if f[0] >= bits - 1e-9]
    return min(above or fits)[2] if fits else "F16"


def _tensor_source(model: torch.nn.Module, arch) -> dict[str, QuantizedTensor | torch.Tensor]:
    """Hugging Face tensor name -> what is stored for it, in the model's order; tied copies left out."""
    items: dict[str, QuantizedTensor | torch.Tensor] = {}
    quantized = {}
    check_no_input_scales({n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}, "GGUF")
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            quantized[name] = mod.quantized_tensor()
    for name, mod in model.named_modules():
        if name in quantized:
            items[f"{name}.weight"] = quantized[name]
        for pname, p in mod.named_parameters(prefix=name, recurse=False):
            items[pname] = p
    head, embed = quantized.get(arch.lm_head), quantized.get(arch.embed)
    if head is not None and embed is not None and head.same_as(embed):
        del items[f"{arch.lm_head}.weight"]
    float_head = dict(model.named_parameters(remove_duplicate=False)).get(f"{arch.lm_head}.weight")
    float_embed = dict(model.named_parameters(remove_duplicate=False)).get(f"{arch.embed}.weight")
    if float_head is not None and float_head is float_embed:
        items.pop(f"{arch.lm_head}.weight", None)
    return items


def _entries(model: torch.nn.Module, gguf_arch: str, types: dict[str, str] | None = None,
             float_type: str = "F16") -> list[_Entry]:
    import gguf
    arch = arch_for(model.config)
    cfg = model.config
    n_blocks = len(model.get_submodule(arch.blocks))
    names = gguf.get_tensor_name_map(model_arch(gguf_arch), n_blocks)
    types = dict(types or {})
    known = set()
    out = []
    for hf_name, value in _tensor_source(model, arch).items():
        module = hf_name.rsplit(".", 1)[0]
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"tensor {hf_name} has no GGUF name for the {gguf_arch} architecture")
        shape = tuple(value.shape)
        keys = [k for k in (module, name, name.removesuffix(".weight")) if k in types]
        want = types[keys[0]] if keys and hf_name.endswith(".weight") else None
        known.update(keys)
        if want is not None:
            if want not in GGUF_TYPES + FLOAT_TYPES:
                raise LowbitError(f"{module}: unknown GGUF type {want!r}; valid: {', '.join(GGUF_TYPES + FLOAT_TYPES)}")
            if want in GGUF_TYPES:
                GGUFSpec(want).check_shape(shape, module)
            t, value = want, None
        elif isinstance(value, QuantizedTensor):
            if not isinstance(value.spec, GGUFSpec):
                raise LowbitError(f"{module} is stored as {value.spec.name}, which GGUF has no type for; quantize "
                                  f"it to a GGUF type instead (e.g. {_suggest(value.spec, shape)})")
            t = value.spec.type
        else:
            t = "F32" if len(shape) == 1 else float_type
        rows = None
        heads = rotary_heads(name, cfg) if gguf_arch in ROTARY_PERMUTED else None
        if heads is not None:
            rows = rotary_rows(shape[0], heads)
        out.append(_Entry(name, hf_name, t, shape, value, rows))
    unknown = set(types) - known
    if unknown:
        raise LowbitError(f"types names tensors this model does not have: {', '.join(sorted(unknown)[:3])}")
    return out


# --------------------------------------------------------------------------------------------------------------
# metadata

def _file_type(entries: list[_Entry]) -> int:
    """general.file_type: llama.cpp's name for the type holding the most weights of the blocks' matrices (the
    embedding and output often take another type, as in llama-quantize's mixes; a K type is named as its _M
    mix, which is what llama-quantize calls a file that is mostly that type)."""
    import gguf
    count: dict[str, int] = {}
    in_blocks = [e for e in entries if e.name.startswith("blk.")] or entries
    for e in in_blocks:
        if len(e.shape) == 2:
            count[e.type] = count.get(e.type, 0) + int(np.prod(e.shape))
    main = max(count, key=count.get) if count else "F32"
    named = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
             "Q5_K": "MOSTLY_Q5_K_M"}.get(main, f"MOSTLY_{main}")
    return int(gguf.LlamaFileType[named])


def _field_value(field):
    """A reader field as (value, type, array item type): strings stay raw bytes (token texts need not be valid
    UTF-8 one by one), numbers plain Python values."""
    import gguf
    vtype = gguf.GGUFValueType(field.types[0])
    if vtype == gguf.GGUFValueType.ARRAY:
        if len(field.types) != 2:
            raise LowbitError(f"metadata {field.name}: nested arrays are not supported")
        sub = gguf.GGUFValueType(field.types[1])
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], vtype, sub
        return [field.parts[i].tolist()[0] for i in field.data], vtype, sub
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    return field.parts[field.data[0]].tolist()[0], vtype, None


@functools.lru_cache(maxsize=4)
def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, tuple]:
    """A GGUF file's metadata, key -> (value, type, item type), parsed once per file version (gguf's reader
    takes seconds over a tokenizer's 100k strings, and a size-budget search asks for sizes many times)."""
    from ..io.gguf_reader import open_reader
    try:
        reader = open_reader(path)
    except Exception as e:   # the reader raises many types for a damaged file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LowbitError(f"corrupt or truncated GGUF file {path}: {why}") from None
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _metadata_from_gguf(writer, path: Path, model: torch.nn.Module) -> str:
    st = path.stat()
    fields = _gguf_metadata(str(path), st.st_size, st.st_mtime_ns)
    if "general.architecture" not in fields:
        raise LowbitError(f"{path} has no general.architecture")
    gguf_arch = fields["general.architecture"][0].decode()
    writer.arch = gguf_arch
    cfg = model.config
    arch = arch_for(cfg)
    expect = {f"{gguf_arch}.embedding_length": cfg.hidden_size,
              f"{gguf_arch}.feed_forward_length": cfg.intermediate_size,
              f"{gguf_arch}.attention.head_count": cfg.num_attention_heads,
              f"{gguf_arch}.attention.head_count_kv": cfg.num_key_value_heads,
              "tokenizer.ggml.tokens": model.get_submodule(arch.embed).num_embeddings}
    for key, want in expect.items():
        have = fields[key][0] if key in fields else want
        have = len(have) if isinstance(have, list) else have
        if have != want:
            raise LowbitError(f"{path} describes another model: {key} is {have}, the model has {want}")
    skip = {"general.architecture"}   # written first by GGUFWriter; file type and version are set in _plan
    blocks = len(model.get_submodule(arch.blocks))
    for key, (value, vtype, sub) in fields.items():
        if key == f"{gguf_arch}.block_count":   # the model's own, where the source has it
            writer.add_block_count(blocks)
        elif key not in skip:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        if key == "general.alignment":
            writer.data_alignment = int(value)
    if f"{gguf_arch}.block_count" not in fields:
        writer.add_block_count(blocks)
    return gguf_arch


def _metadata_from_hf(writer, path: Path, model: torch.nn.Module) -> str:
    """The keys llama.cpp's converter writes for these families, from config.json and the tokenizer."""
    import gguf
    cfg = model.config
    gguf_arch = GGUF_ARCH.get(cfg.model_type)
    if gguf_arch is None:
        raise LowbitError(f"no GGUF architecture for model type {cfg.model_type!r}")
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise LowbitError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not written to GGUF "
                          "by lowbit")
    writer.arch = gguf_arch
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(getattr(cfg, "_name_or_path", "") or path.name)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(len(model.get_submodule(arch_for(cfg).blocks)))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or gguf_arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(model.get_submodule(arch_for(cfg).embed).num_embeddings)
    writer.add_rope_dimension_count(head_dim)
    _tokenizer_from_hf(writer, path, model.get_submodule(arch_for(cfg).embed).num_embeddings)
    return gguf_arch


def _tokenizer_from_hf(writer, path: Path, n_vocab: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model: every id up to the embedding's size
    (ids the tokenizer lacks are [PADi], unused), added tokens control (special) or user-defined."""
    import gguf
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        spec = json.loads((path / "tokenizer.json").read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    if spec.get("model", {}).get("type") != "BPE":
        raise LowbitError(f"{path}: only byte-level BPE tokenizers are written to GGUF by lowbit "
                          f"(this one is {spec.get('model', {}).get('type')!r})")
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(max(n_vocab, len(vocab))):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(vocab[i])
            kinds.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by name from a hash of sample tokenizations; lowbit does not
    # keep that table, so the generic one is named (token ids given directly are unaffected)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(k) for k in kinds])
    gguf.SpecialVocab(path, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------------------------------------------
# the file

def _plan(model_or_loaded, source, types: dict[str, str] | None, float_type: str = "F16"):
    """A GGUFWriter holding the metadata and tensor infos (no file yet), and the tensors in file order."""
    import gguf
    model, loaded_from = _model_of(model_or_loaded)
    path = _resolve(source, loaded_from, model)
    arch_for(model.config)
    writer = gguf.GGUFWriter(None, GGUF_ARCH.get(model.config.model_type, model.config.model_type))
    if path.is_file():
        gguf_arch = _metadata_from_gguf(writer, path, model)
    elif path.is_dir():
        gguf_arch = _metadata_from_hf(writer, path, model)
    else:
        raise LowbitError(f"source {path} is neither a GGUF file nor a model directory")
    # GGUFWriter wrote general.architecture for the name it was made with; keep the one the metadata says
    writer.kv_data[0][gguf.Keys.General.ARCHITECTURE] = gguf.GGUFValue(gguf_arch, gguf.GGUFValueType.STRING)
    entries = _entries(model, gguf_arch, types, float_type)
    # where the source has them (or last): the file's main type and the block formats' version
    kv = writer.kv_data[0]
    kv[gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(_file_type(entries), gguf.GGUFValueType.UINT32)
    kv[gguf.Keys.General.QUANTIZATION_VERSION] = gguf.GGUFValue(gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    for e in entries:
        if e.type in FLOAT_TYPES:
            writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32 if e.type == "F32" else np.float16),
                                   e.nbytes)
        else:
            byte_shape = (*e.shape[:-1], e.nbytes // int(np.prod(e.shape[:-1])))
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), e.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[e.type])
    return writer, entries


def _value_bytes(value, vtype, sub=None) -> int:
    import gguf
    V = gguf.GGUFValueType
    if vtype == V.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype == V.ARRAY:   # an item type left out is inferred as GGUFWriter infers it
        sub = sub if sub is not None else V.UINT8 if isinstance(value, bytes) else V.get_type(value[0])
        return 4 + 8 + sum(_value_bytes(v, sub) for v in value)
    return {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
            V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}[vtype]


def _size(writer) -> int:
    """Bytes GGUFWriter writes for this plan: header (magic, version, tensor and key counts), each key (name,
    type, value), each tensor info (name, dims, shape, type, offset), padding to the alignment, then each
    tensor's data padded to the alignment."""
    import gguf
    align = writer.data_alignment
    pad = gguf.GGUFWriter.ggml_pad
    n = 4 + 4 + 8 + 8
    for key, v in writer.kv_data[0].items():
        n += _value_bytes(key, gguf.GGUFValueType.STRING) + 4 + _value_bytes(v.value, v.type, v.sub_type)
    for name, ti in writer.tensors[0].items():
        n += _value_bytes(name, gguf.GGUFValueType.STRING) + 4 + 8 * len(ti.shape) + 4 + 8
    return pad(n, align) + sum(pad(ti.nbytes, align) for ti in writer.tensors[0].values())


def gguf_file_bytes(model_or_loaded, source=None, types: dict[str, str] | None = None) -> int:
    """The exact size in bytes of the GGUF file `write_gguf` would write for this model, without writing it.
    `types` maps module names as recipes name them ("model.layers.0.mlp.down_proj") or GGUF tensor names
    ("blk.0.ffn_down", "blk.0.ffn_down.weight") to the GGUF type ("Q4_K", ..., "F16", "F32") to count them as,
    instead of what the model stores: a size-budget allocator's "how big is the file with these types"."""
    writer, _ = _plan(model_or_loaded, source, types)
    return _size(writer)


def gguf_overhead_bytes(model_or_loaded, names: list[str], source=None) -> int:
    """What a GGUF file of this model spends besides the data of the tensors `names` (module names): header,
    metadata, tensor infos, every other tensor, and the worst-case alignment padding of the named ones — the
    fixed part of a size budget whose named tensors' types are still to be chosen."""
    model, _ = _model_of(model_or_loaded)
    as_f16 = gguf_file_bytes(model_or_loaded, source, {n: "F16" for n in names})
    return as_f16 - sum(2 * model.get_submodule(n).weight.numel() for n in names) + 32 * len(names)


def write_gguf(model_or_loaded, out_path: str | os.PathLike, *, source=None, overwrite: bool = False,
               float_type: str = "F16") -> Path:
    """Write the model as a GGUF file at `out_path` (see the module docstring for what goes in). `source` is
    the GGUF file or Hugging Face directory the model came from (default: where a Loaded was loaded from, or
    the base its quantization record names). `float_type`: F16 (default) or F32 for the 2-D tensors kept in
    float (an F32 file of the float model is llama.cpp's own reference for it). The file appears only when
    complete. Returns its path."""
    if float_type not in FLOAT_TYPES:
        raise LowbitError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    out = Path(out_path)
    check_output(out, overwrite)
    if out.is_dir():
        raise LowbitError(f"output {out} is a directory, not a file")
    writer, entries = _plan(model_or_loaded, source, None, float_type)
    expected = _size(writer)
    with atomic_file(out, overwrite) as part:
        try:
            writer.write_header_to_file(part)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for e in entries:
                writer.write_tensor_data(e.array())
        finally:
            writer.close()
        if part.stat().st_size != expected:
            raise LowbitError(f"internal error: {out} would have {part.stat().st_size} bytes, expected {expected}")
    return out
