"""Quantizing a model larger than memory: one block read from disk, quantized, written out and freed at a time.

The model is built on the meta device; only the parts outside the decoder blocks (embedding, final norm,
lm_head) are read into memory. `lowbit.quantize` then runs as usual, with two hooks: before block i is
quantized its weights are read from the model's safetensors files (float32, as `load_model` gives them), and
once block i has produced the next block's calibration inputs it is cast, written to its own checkpoint shard
and sent back to the meta device. Peak memory is the non-block parts, one block in float32, the calibration
activations and the shard being written — it does not grow with the number of blocks. The result is the same
checkpoint (tensors and logits) as quantizing the whole model in memory, stored as shards with an index.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.checkpoint import ShardedCheckpointWriter, checkpoint_tensors
from ..models.arch import arch_for
from ..nn.surgery import set_submodule, set_tensors
from ..config import QuantConfig
from ..errors import LowbitError
from ..models.sources import is_lowbit_checkpoint
from ..data import CALIB_SAMPLES, CALIB_SEQLEN
from ..quantize import cast_unquantized, quantize, recipe_for
from ..recipes import Recipe
from .lazy import SafetensorsStore, meta_model


def quantize_streamed(path: str | Path, out: str | Path, config: QuantConfig | Recipe | None = None, *,
                      calibration=None, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
                      seed: int = 0, dtype: torch.dtype = torch.bfloat16, base: str | None = None,
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Quantize the Hugging Face safetensors model at `path` into a lowbit checkpoint at `out`, block by block.
    `config`, `calibration` and its settings are those of `lowbit.quantize` (calibration read only when a
    planned method calibrates; text is cut with the model's own tokenizer)."""
    path = Path(path)
    if not path.is_dir() or is_lowbit_checkpoint(path):
        raise LowbitError(f"streamed quantization reads a Hugging Face safetensors directory, {path} is not one "
                          "(a GGUF file or a lowbit checkpoint is loaded whole: quantize it without streaming)")
    model, tokenizer, block_files = meta_model(path, dtype, resident_blocks=())
    arch = arch_for(model)
    recipe = recipe_for(config, arch.blocks)
    plan = recipe.plan(model)
    # outside the blocks: float32 when calibration runs through the embedding or something outside the blocks
    # is quantized (as in memory), else the final dtype at once (half the memory; the same values once cast)
    if any(s.needs_calibration for s in plan.values()) or any(not n.startswith(arch.blocks + ".") for n in plan):
        model, tokenizer, block_files = meta_model(path, torch.float32, resident_blocks=())
    blocks = model.get_submodule(arch.blocks)
    store = SafetensorsStore(block_files, torch.float32)
    writer = ShardedCheckpointWriter(out, overwrite)

    def materialize(i, block):
        block.to_empty(device="cpu")
        set_tensors(block, store.load(i))

    def release(i, block):
        cast_unquantized(block, dtype)
        tensors, tied = checkpoint_tensors(block, f"{arch.blocks}.{i}.")
        writer.add(f"model-block-{i:05d}.safetensors", tensors, tied)
        block.to("meta")

    try:
        quantize(model, recipe, calibration=calibration, tokenizer=tokenizer, calib_samples=calib_samples,
                 calib_seqlen=calib_seqlen, seed=seed, dtype=dtype, progress=progress,
                 materialize=materialize, release=release)
        set_submodule(model, arch.blocks, torch.nn.ModuleList())       # the rest of the model, without its blocks
        try:
            rest, tied = checkpoint_tensors(model)
        finally:
            set_submodule(model, arch.blocks, blocks)
        writer.tied.update(tied)
        return writer.finish(model, tokenizer, rest, base=base or str(path),
                             extra={"settings": {"streamed": True}})
    except BaseException as e:
        writer.abort(e)
        raise
