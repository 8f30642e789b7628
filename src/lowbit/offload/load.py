"""Loading any model under a weight budget, choosing how: the one decision a command line or an application
makes before generating with offloaded blocks.

A Hugging Face directory is opened lazily (`offload.lazy`: blocks beyond the budget are never loaded whole,
they stream from the model's own files). Anything else (a GGUF file, a lowbit checkpoint), or a directory
when an offload directory is asked for, is loaded whole first, then the blocks beyond the budget move to a
store (`offload.runtime.offload_blocks`: disk shards in the offload directory, else host RAM).
"""

from __future__ import annotations

import os

from ..errors import LowbitError
from ..models.hf import Loaded
from ..models.sources import is_lowbit_checkpoint, load_model, resolve_source
from .lazy import open_streamed
from .runtime import StreamedModel, offload_blocks


def load_with_budget(source: str | os.PathLike, max_memory: int | str | None = None,
                     offload_dir: str | os.PathLike | None = None,
                     kernel: str = "auto", gguf: str = "float") -> tuple[Loaded, StreamedModel | None]:
    """Load `source` ("default", a Hugging Face directory, a GGUF file or a lowbit checkpoint) with at most
    `max_memory` bytes (or '2GB') of weights resident. Returns the loaded model and its streaming state (None
    without a budget; `.plan.describe()` says what streams). `kernel` applies to quantized modules; `gguf`: how a GGUF file
    loads (load_model's: "float", or "blocks" as stored)."""
    if offload_dir is not None and max_memory is None:
        raise LowbitError("offload_dir needs max_memory (the budget decides which blocks are offloaded)")
    if max_memory is None:
        return load_model(source, kernel=kernel, gguf=gguf), None
    path = resolve_source(source)
    if path.is_dir() and not is_lowbit_checkpoint(path) and offload_dir is None:
        return open_streamed(path, max_memory)
    loaded = load_model(source, kernel=kernel, gguf=gguf)
    return loaded, offload_blocks(loaded.model, max_memory, offload_dir)
