"""Writers and readers: lowbit's own checkpoint (checkpoint), and the formats serving engines load: Hugging Face
directories in compressed-tensors, GPTQ or AWQ form, and GGUF files for llama.cpp (gguf), chosen by name
through `EXPORTERS`."""

from __future__ import annotations

from pathlib import Path

from . import awq, compressed_tensors, gguf, gptq
from ..errors import LowbitError


def _gguf(model, tokenizer, out, *, overwrite: bool = False, tp: int | None = None) -> tuple[Path, list[str]]:
    """A GGUF file (the source's metadata and tokenizer: see export.gguf); llama.cpp does no tensor parallelism."""
    return gguf.write_gguf(model, out, overwrite=overwrite), []


# format name -> export(model, tokenizer, out, *, overwrite, tp) -> (path, warnings)
EXPORTERS = {
    "compressed-tensors": compressed_tensors.export,
    "gptq": gptq.export,
    "awq": awq.export,
    "gguf": _gguf,
}


def export(loaded_or_checkpoint, fmt: str, out, *, overwrite: bool = False, tp: int | None = None,
           tokenizer=None) -> tuple[Path, list[str]]:
    """Write a quantized model (a `Loaded`, a lowbit checkpoint path, or a torch model with `tokenizer`) as a
    Hugging Face directory in format `fmt`. Returns the directory and the warnings about serving it (shards that
    do not split across `tp` GPUs, layers off the engines' fast kernels). Nothing is written on an error."""
    from ..io.atomic import check_output
    from ..models.hf import Loaded
    if fmt not in EXPORTERS:
        raise LowbitError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORTERS)}")
    check_output(out, overwrite)
    src = loaded_or_checkpoint
    if not isinstance(src, Loaded) and not hasattr(src, "named_modules"):
        from ..models.sources import load_model
        src = load_model(src)
    if fmt == "gguf" and isinstance(src, Loaded):   # the metadata and tokenizer come from where it was loaded
        return gguf.write_gguf(src, out, overwrite=overwrite), []
    model, tok = (src.model, src.tokenizer) if isinstance(src, Loaded) else (src, tokenizer)
    return EXPORTERS[fmt](model, tok, out, overwrite=overwrite, tp=tp)
