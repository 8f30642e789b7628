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
from ..quantize import cast_unquantized, quantize
from ..recipes import Recipe
from .lazy import SafetensorsStore, meta_model


def quantize_streamed(path: str | Path, out: str | Path, recipe: Recipe | None = None, *,
                      calibration: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                      base: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Quantize the Hugging Face safetensors model at `path` into a lowbit checkpoint at `out`, block by block."""
    path = Path(path)
    # outside the blocks: float32 when calibration runs through the embedding (as in memory), else the
    # final dtype at once (half the memory; the same values once cast)
    model, tokenizer, block_files = meta_model(path, torch.float32 if calibration is not None else dtype,
                                               resident_blocks=())
    arch = arch_for(model.config)
    recipe = recipe or Recipe.default(blocks=arch.blocks)
    outside = [n for n in recipe.plan(model) if not n.startswith(arch.blocks + ".")]
    if outside and next(model.parameters()).dtype != torch.float32:   # e.g. an lm_head to quantize
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
        quantize(model, recipe, calibration=calibration, dtype=dtype, progress=progress,
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
