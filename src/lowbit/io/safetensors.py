"""The safetensors layout: the dtype table, header parsing, file validation and shard indexes.

A safetensors file is 8 bytes (little-endian u64) header length N, N bytes of JSON
{name: {"dtype": "F32"|"BF16"|..., "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets count from the end of the header. A model stored in several files lists each tensor's
file in `model.safetensors.index.json` ({"weight_map": {name: file}}); the files must lie in the directory
of the index: a name that is absolute or climbs out of it with `..`, or a link that leads out of it, is
refused, so a model directory cannot make lowbit read arbitrary files. One layout is allowed to link out: the
Hugging Face hub cache, whose `snapshots/REV/` files are links into the repository's `blobs/` folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError

INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int         # absolute position in the file
    nbytes: int


def _header_json(path: Path) -> tuple[int, dict]:
    """(N, the header's JSON object), with N checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return n, header


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The names of the tensors a file holds (from its header alone, whatever their dtypes)."""
    return [k for k in _header_json(Path(path))[1] if k != "__metadata__"]


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The file's tensors (name -> dtype, shape, absolute byte range), checked against the file's size."""
    path = Path(path)
    n, header = _header_json(path)
    size = path.stat().st_size
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[v["dtype"]]
            begin, end = v["data_offsets"]
            shape = tuple(int(d) for d in v["shape"])
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"corrupt safetensors file {path}: bad entry for tensor '{name}'") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or 8 + n + end > size:
            raise LowbitError(f"corrupt or truncated safetensors file {path}: tensor '{name}' does not fit")
        out[name] = TensorEntry(dtype, shape, 8 + n + begin, nbytes)
    return out


def check_safetensors(path: str | os.PathLike) -> None:
    """Open every tensor as the safetensors library does and check the file covers it: catches truncated and
    corrupt files before anything is loaded from them."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own error types and OSError
        raise LowbitError(f"corrupt or truncated safetensors file {path}: {e}") from None


def read_index(directory: str | os.PathLike) -> dict[str, Path] | None:
    """Tensor name -> shard file, from the directory's index (None when it has none). Every shard must lie in
    the directory itself."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = {k: v for k, v in weight_map.items() if isinstance(v, str)}
        if len(names) != len(weight_map):
            raise ValueError("shard names must be strings")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise LowbitError(f"corrupt {index}: {e}") from None
    root = directory.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None   # the hub cache layout
    for shard in set(names.values()):
        # lexical first ("sub/../x" is fine, "sub/../../x" is not), then where a link leads
        target = (root / shard).resolve()
        if not shard or Path(shard).is_absolute() or Path(os.path.normpath(shard)).parts[0] == ".." or not (
                target.is_relative_to(root) or blobs is not None and target.is_relative_to(blobs)):
            raise LowbitError(f"{index} names the shard '{shard}', which is outside {directory}")
    return {k: directory / v for k, v in names.items()}



def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `tensors` as one safetensors file, the same tensors always as the same bytes.

    Why not safetensors' own save_file: it orders the header's metadata by a hash seeded per process (two runs
    of the same command wrote different bytes), and it copies every tensor into one buffer before writing
    (here each tensor's memory is written as it is). The order is save_file's: element size, largest first,
    then name, so that every tensor starts at a multiple of its element size; the header is padded with spaces
    to a multiple of 8. Little-endian, as torch holds tensors on every platform lowbit runs on. A failed write
    is an OSError, which the atomic outputs (io.atomic) report as one clean error."""
    meta = {"format": "pt", "producer": "lowbit", **(metadata or {})}
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": {k: str(v) for k, v in meta.items()}}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise LowbitError(f"cannot write tensor '{name}' to safetensors: dtype {t.dtype} has no name there")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())   # the tensor's own memory, no copy
