"""gguf-py's reader of GGUF files, with the file's bytes sliced as a plain array (the same values, parsed about
3x faster), and one reader per file while a load asks for it several times.

`gguf.GGUFReader` maps the file as a `numpy.memmap` and slices it once or twice per value it reads; a
tokenizer's vocabulary and merges are about 100k strings. Every slice of numpy's memmap subclass runs a
Python-level `__getitem__` and `__array_finalize__`; a slice of a plain ndarray over the same mapping does not.
The fields, their parts (same dtypes) and the tensors' data are views of the same bytes either way.
"""

from __future__ import annotations

import contextlib
import os

import gguf
import numpy as np


class GGUFReader(gguf.GGUFReader):
    """`gguf.GGUFReader` whose `data` (the whole file, mapped) is a plain ndarray view of its memmap; the view
    keeps the mapping alive."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._plain = mapped.view(np.ndarray)


_shared: dict | None = None   # (file, mode, size, mtime) -> its reader, while shared_readers() is active


def open_reader(path, mode: str = "r") -> GGUFReader:
    """A reader of the GGUF file at `path`: inside `shared_readers()`, the one already built for this version
    of the file, if any."""
    if _shared is None:
        return GGUFReader(path, mode)
    st = os.stat(path)
    key = (os.path.realpath(path), mode, st.st_size, st.st_mtime_ns)
    if key not in _shared:
        _shared[key] = GGUFReader(path, mode)
    return _shared[key]


@contextlib.contextmanager
def shared_readers():
    """Within: one reader per file version, for `open_reader` and for gguf-py's own name `gguf.GGUFReader`,
    which transformers calls three times per load (config, tokenizer, weights). Readers are read-only to their
    users, so sharing them changes nothing but the time. The name is restored on exit."""
    global _shared
    own, outer = gguf.GGUFReader, _shared
    _shared = {} if outer is None else outer
    gguf.GGUFReader = open_reader
    try:
        yield
    finally:
        gguf.GGUFReader, _shared = own, outer
