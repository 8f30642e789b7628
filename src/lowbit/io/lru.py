"""Bounding a cache directory: what lowbit keeps between runs (a GGUF file's float copy, an evaluation's base
pass) lives in a folder per kind, and each write trims its folder to a size, least recently used entries first
(an entry is a file or a directory; its modification time says when it was last written or used)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def size_of(entry: Path) -> int:
    if entry.is_dir():
        return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    return entry.stat().st_size


def touch(entry: Path) -> None:
    """Mark an entry as used now (the last to be trimmed)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def trim(folder: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Remove the entries of `folder` (other than `keep`, counted first) beyond `max_bytes` in all, the least
    recently used first; entries whose names start with "." (temporary ones being written) are left alone.
    Returns what was removed. Entries vanishing meanwhile (another process trimming) are skipped."""
    removed = []
    entries = []
    for e in folder.iterdir() if folder.is_dir() else []:
        if e.name.startswith(".") or e == keep:
            continue
        with contextlib.suppress(OSError):
            entries.append((e.stat().st_mtime, e))
    total = size_of(keep) if keep.exists() else 0
    for _mtime, e in sorted(entries, key=lambda t: t[0], reverse=True):
        with contextlib.suppress(OSError):
            total += size_of(e)
            if total > max_bytes:
                shutil.rmtree(e) if e.is_dir() else e.unlink()
                removed.append(e)
    return removed
