"""Opening a Hugging Face safetensors model that does not fit in memory: blocks are read from its own files.

The model is built on the meta device (no memory), then only what the plan keeps resident is read from the
safetensors files: the parts outside the decoder blocks and the blocks that fit the budget. Streamed blocks are
never loaded whole: `SafetensorsStore` reads one block's tensors from the model's files when the block is about
to run (through the same prefetching hooks as `offload_blocks`). Peak memory is therefore the budget plus the
runtime's own overhead, whatever the model's size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..io.safetensors import check_safetensors, read_header, read_index, tensor_names
from ..models.arch import arch_for
from ..models.hf import Loaded, read_config
from ..models.moe import per_expert_name, unstack_experts
from ..nn.surgery import module_tensors, placeholder_like, rebuild_meta_buffers, set_tensors
from .planner import budget_bytes, plan_offload
from .reader import BufferPool, ReadPlan
from .runtime import StreamedModel, install_streaming


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: from the index if there is one, else from the headers
    of every safetensors file in the directory."""
    where = read_index(path)
    if where is not None:
        return where
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path} has no safetensors weights (streaming needs safetensors)")
    return {name: f for f in files for name in tensor_names(f)}


def _held_bytes(files: set[Path], dtype: torch.dtype) -> dict[str, int]:
    """Tensor name -> bytes once loaded (floating tensors cast to `dtype`, as `meta_model` does), from the
    safetensors headers only."""
    out = {}
    for f in files:
        for name, e in read_header(f).items():
            out[name] = e.nbytes // e.dtype.itemsize * dtype.itemsize if e.dtype.is_floating_point else e.nbytes
    return out


class SafetensorsStore:
    """Block i's tensors, read from the model's own safetensors files (names relative to the block)."""

    kind = "safetensors"

    def __init__(self, files_by_block: dict[int, dict[str, tuple[Path, str]]], dtype: torch.dtype,
                 pin_memory: bool = False):
        self.files_by_block = files_by_block
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._headers: dict[Path, dict] = {}
        self._plans: dict[tuple[int, Path], ReadPlan] = {}
        self._pool = BufferPool(pin_memory)
        self._checked: set[int] = set()

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors; on a block's first read in this run its float weights are checked for
        NaN/Inf, as loading a model whole does (models.sources.check_finite)."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for local, (f, full) in self.files_by_block[index].items():
            by_file.setdefault(f, []).append((local, full))
        out = {}
        for f, names in by_file.items():
            if (index, f) not in self._plans:
                if f not in self._headers:
                    self._headers[f] = read_header(f)
                self._plans[index, f] = ReadPlan.make(self._headers[f], [full for _, full in names])
            # read on this (reader) thread into reused buffers, not memory-mapped and page-faulted later
            read = self._plans[index, f].read(f, self._pool)
            for local, full in names:
                t = read[full]
                out[local] = t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t
        if index not in self._checked:
            for local, t in out.items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    file, full = self.files_by_block[index][local]
                    raise LowbitError(f"weight {full} contains NaN or Inf (in {file.name})")
            self._checked.add(index)
        return out


def _block_names(index: dict[str, Path], blocks_path: str) -> dict[str, tuple[int, str]]:
    """Tensor name -> (block index, name inside the block), for the tensors of decoder blocks."""
    out = {}
    for name in index:
        m = re.match(re.escape(blocks_path + ".") + r"(\d+)\.(.+)", name)
        if m:
            out[name] = (int(m.group(1)), m.group(2))
    return out


def block_sizes(path: Path, dtype: torch.dtype) -> tuple[int, list[int]]:
    """(bytes outside the blocks, bytes of each block) once loaded in `dtype`, from the file headers only."""
    arch = arch_for(read_config(path))
    index = _tensor_files(path)
    sizes = _held_bytes(set(index.values()), dtype)
    block_of = _block_names(index, arch.blocks)
    n_blocks = 1 + max((i for i, _ in block_of.values()), default=-1)
    per_block = [0] * n_blocks
    fixed = 0
    for name, b in sizes.items():
        if name in block_of:
            per_block[block_of[name][0]] += b
        else:
            fixed += b
    return fixed, per_block


def meta_model(path: Path, dtype: torch.dtype, resident_blocks) -> tuple[nn.Module, object, dict]:
    """The model with everything outside the decoder blocks, and the blocks in `resident_blocks`, read from
    `path`; every other block stays on the meta device. Returns (model, tokenizer, {block: {name in block:
    (file, full name)}}) for the blocks left on disk."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    arch = arch_for(read_config(path))
    index = _tensor_files(path)
    for f in set(index.values()):
        check_safetensors(f)
    block_of = _block_names(index, arch.blocks)
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # names as the files store them -> names in the model: transformers' own renamings for the family (Mixtral:
    # block_sparse_moe -> mlp), and experts stored one Linear each while the model stacks them in memory get
    # lowbit's per-expert layout (models.moe), read in its terms
    rename = checkpoint_renaming(config)
    renamed = {n: rename(n) for n in index}
    if any(per_expert_name(n) for n in renamed.values()) and unstack_experts(model):
        renamed = {n: per_expert_name(r) or r for n, r in renamed.items()}
    index = {renamed[n]: f for n, f in index.items()}
    block_of = _block_names(index, arch.blocks)
    resident = set(resident_blocks)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        with safe_open(str(f), framework="pt") as h:
            for stored in h.keys():
                name = renamed.get(stored, stored)
                blk = block_of.get(name)
                if blk is None or blk[0] in resident:
                    # kept as read (memory-mapped when the dtype already matches): copying here would hold
                    # every resident tensor twice for a moment, and the budget is about that peak
                    t = h.get_tensor(stored)
                    state[name] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    on_disk = {i for i, _ in block_of.values()} - resident
    expected = [k for k in model.state_dict() if not _tied(model, k)
                and not any(k.startswith(f"{arch.blocks}.{i}.") for i in on_disk)]
    missing = [k for k in expected if k not in state]
    if missing:
        raise LowbitError(f"{path}: weights missing from the safetensors files: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_meta_buffers(model, config)
    files = {i: {} for i in on_disk}
    stored_as = {v: k for k, v in renamed.items()}
    for name, (i, local) in block_of.items():
        if i in files:
            files[i][local] = (index[name], stored_as.get(name, name))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load the tokenizer from {path}: {str(e).splitlines()[0]}") from None
    return model, tokenizer, files


def open_streamed(path: str | Path, budget: int | str, dtype: torch.dtype = torch.bfloat16) -> tuple[Loaded, StreamedModel]:
    """Open the HF directory `path` with at most `budget` bytes of weights in memory; returns the loaded model
    (blocks beyond the budget streamed from the model's files) and the streaming state (plan, events)."""
    path = Path(path)
    budget = budget_bytes(budget)
    fixed, per_block = block_sizes(path, dtype)
    plan = plan_offload(fixed, per_block, budget)
    model, tokenizer, files = meta_model(path, dtype, plan.resident)
    blocks = model.get_submodule(arch_for(model).blocks)
    # empty placeholders of the right dtype for the streamed blocks (filled only while each one runs)
    for i in plan.streamed:
        set_tensors(blocks[i], {k: placeholder_like(t, "cpu") for k, t in module_tensors(blocks[i]).items()
                                if t.is_meta})
    sm = install_streaming(model, plan, SafetensorsStore(files, dtype), blocks)
    return Loaded(model, tokenizer, str(path)), sm


def checkpoint_renaming(config):
    """str -> str: the tensor renamings transformers applies when it loads this family's checkpoints (its weight
    conversion table; converters that merge tensors are not applied), or the identity where it has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
        renamings = [t for t in get_checkpoint_conversion_mapping(config.model_type) or []
                     if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):   # another transformers version: names are taken as stored
        return lambda name: name
    return (lambda name: apply_renamings(name, renamings)) if renamings else (lambda name: name)


def _tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
