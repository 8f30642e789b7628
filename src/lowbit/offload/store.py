"""Weight stores: where the tensors of a decoder block live while they are not resident.

`DiskStore` writes each block as one safetensors shard in an offload directory, with a manifest
(`offload.json`: per shard its file name, byte size and SHA-256) written last, so a directory without a manifest
is never taken for a complete store. Shards are read straight into reused buffers (`offload.reader`:
pinned when the compute device is a GPU); each shard's checksum is verified the first time
it is read in a process (a corrupted or truncated shard is an error, not wrong logits).
`RamStore` keeps the tensors in host memory (pinned when the compute device is a GPU).

An offload directory is lowbit's own when it holds that manifest: a later run reuses it as it is when the
manifest's fingerprint (a SHA-256 over every streamed block's tensor names, dtypes, shapes and bytes) equals
the model's, and replaces it otherwise. A non-empty directory without the manifest is someone else's and is
never touched. `DiskStore.remove()` deletes a store's directory (what `lowbit generate` does at exit unless
`--keep-offload`).

A block's tensors are its parameters and buffers by name (`nn.surgery.module_tensors`: non-persistent buffers
such as a QuantLinear's packed weight included), stored exactly as they are: dtype, shape, bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LowbitError
from ..io.atomic import atomic_dir
from ..io.safetensors import read_header, write_safetensors
from .reader import BufferPool, ReadPlan

MANIFEST = "offload.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def blocks_fingerprint(blocks: dict[int, dict[str, torch.Tensor]]) -> str:
    """SHA-256 over the blocks' indices and tensors (name, dtype, shape, bytes), in a fixed order."""
    h = hashlib.sha256()
    for i in sorted(blocks):
        for name in sorted(blocks[i]):
            t = blocks[i][name].detach().contiguous().cpu()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class RamStore:
    """Block tensors kept in host memory; `load` hands them back without copying."""

    kind = "ram"

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.blocks[index] = {k: (v.detach().cpu().pin_memory() if self.pin_memory else v.detach().cpu())
                              for k, v in tensors.items()}

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return self.blocks[index]

    def nbytes(self, index: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks[index].values())


class DiskStore:
    """Block tensors in safetensors shards under `root`, read into RAM buffers (pinned if `pin_memory`) that are
    reused once the tensors of an earlier read are released (`offload.reader.BufferPool`)."""

    kind = "disk"

    def __init__(self, root: str | os.PathLike, pin_memory: bool = False):
        self.root = Path(root)
        self.pin_memory = pin_memory
        self.shards: dict[int, dict] = {}
        self._plans: dict[int, ReadPlan] = {}
        self._pool = BufferPool(pin_memory)
        self._verified: set[int] = set()
        manifest = self.root / MANIFEST
        if manifest.is_file():
            try:
                self.shards = {int(k): v for k, v in json.loads(manifest.read_text())["shards"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise LowbitError(f"corrupt offload manifest {manifest}: {e}") from None

    @classmethod
    def create(cls, root: str | os.PathLike, blocks: dict[int, dict[str, torch.Tensor]],
               pin_memory: bool = False) -> "DiskStore":
        """Write all shards, then the manifest, and publish the directory at once (`io.atomic`): a failure
        leaves nothing. `root` must not exist or be empty."""
        root = Path(root)
        fingerprint = blocks_fingerprint(blocks)
        if root.exists() and any(root.iterdir()):
            if not (root / MANIFEST).is_file():
                raise LowbitError(f"offload directory {root} is not empty (and not an offload directory of lowbit)")
            try:
                reusable = json.loads((root / MANIFEST).read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError, AttributeError):
                reusable = False
            if reusable:   # the same blocks: every shard is still checked against its hash on first read
                return cls(root, pin_memory)
        shards = {}
        with atomic_dir(root, overwrite=True, what="the offload directory") as tmp:
            for i, tensors in blocks.items():
                name = f"block-{i:05d}.safetensors"
                write_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / name)
                shards[i] = {"file": name, "bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            (tmp / MANIFEST).write_text(json.dumps({"fingerprint": fingerprint,
                                                    "shards": {str(k): v for k, v in shards.items()}}, indent=1))
        # not marked verified: a shard is checked against its hash on its first read in every run, so a file
        # damaged between writing and reading is an error, never silently wrong output
        return cls(root, pin_memory)

    def remove(self) -> None:
        """Delete the store's directory (only a directory with lowbit's manifest)."""
        if (self.root / MANIFEST).is_file():
            shutil.rmtree(self.root, ignore_errors=True)

    def _path(self, index: int) -> Path:
        if index not in self.shards:
            raise LowbitError(f"offload store {self.root} has no shard for block {index}")
        return self.root / self.shards[index]["file"]

    def verify(self, index: int) -> None:
        path, meta = self._path(index), self.shards[index]
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise LowbitError(f"offloaded shard {path.name} is corrupted or truncated (checksum mismatch)")
        self._verified.add(index)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors, read from disk into RAM (on the caller's thread: the reader's)."""
        if index not in self._verified:
            self.verify(index)
        path = self._path(index)
        if index not in self._plans:
            self._plans[index] = ReadPlan.make(read_header(path))
        return self._plans[index].read(path, self._pool)

    def nbytes(self, index: int) -> int:
        return self.shards[index]["bytes"]
