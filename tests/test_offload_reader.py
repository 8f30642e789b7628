"""The direct safetensors reader used by streaming: exact bytes, alignment, scatter reads, bad files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.io.safetensors import read_header
from lowbit.offload.reader import ALIGN, read_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 13, generator=g),                       # odd byte count: next one unaligned
        "b.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "c.packed": torch.randint(0, 255, (9, 11), generator=g, dtype=torch.uint8),
        "d.codes": torch.randint(-128, 127, (3, 33), generator=g, dtype=torch.int8),
        "e.mask": torch.rand(17, generator=g) > 0.5,
        "f.scalar": torch.tensor(3.25, dtype=torch.float64),
        "g.empty": torch.empty(0, 4),
        "h.fp8": torch.randn(4, 6, generator=g).to(torch.float8_e4m3fn),
        "i.long": torch.arange(10, dtype=torch.int64),
        "j.half": torch.randn(3, generator=g).to(torch.float16),
    }


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_reads_every_tensor_exactly_and_aligned(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file(_tensors(), str(f), metadata={"format": "pt"})
    want = load_file(str(f))
    got = read_tensors(f, read_header(f))
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(_bytes(got[k]), _bytes(t)), k     # bit-exact, NaN and -0.0 included
        if t.numel():
            assert got[k].data_ptr() % ALIGN == 0, k


def test_reads_a_subset_in_any_order(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file(_tensors(), str(f))
    want = load_file(str(f))
    got = read_tensors(f, read_header(f), ["i.long", "a.weight", "h.fp8"])
    assert list(sorted(got)) == ["a.weight", "h.fp8", "i.long"]
    assert torch.equal(got["i.long"], want["i.long"]) and torch.equal(got["a.weight"], want["a.weight"])


def test_truncated_or_corrupt_files_are_one_line_errors(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file(_tensors(), str(f))
    data = f.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-40])
    with pytest.raises(LowbitError, match="truncated.*does not fit"):
        read_header(cut)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(LowbitError, match="corrupt or truncated"):
        read_header(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(LowbitError, match="corrupt"):
        read_header(garbage)
    # a header read before the file was cut: the read itself stops short
    entries = read_header(f)
    f.write_bytes(data[:-40])
    with pytest.raises(LowbitError, match="truncated"):
        read_tensors(f, entries)


def test_buffer_pool_reuses_only_released_buffers(tmp_path):
    from lowbit.offload.reader import BufferPool
    f = tmp_path / "x.safetensors"
    save_file(_tensors(), str(f))
    entries, pool = read_header(f), BufferPool()
    want = load_file(str(f))
    a = read_tensors(f, entries, pool=pool)
    b = read_tensors(f, entries, pool=pool)            # a is alive: a second buffer
    assert pool.allocated == 2
    ptr_a = a["a.weight"].data_ptr()
    del a
    c = read_tensors(f, entries, pool=pool)            # a's buffer is free again: reused, not allocated
    assert pool.allocated == 2 and c["a.weight"].data_ptr() == ptr_a
    for k in want:
        assert torch.equal(_bytes(c[k]), _bytes(want[k])) and torch.equal(_bytes(b[k]), _bytes(want[k]))
    keep = c["i.long"]                                 # one tensor alive keeps its whole buffer in use
    del b, c
    d = read_tensors(f, entries, pool=pool)
    assert d["i.long"].data_ptr() != keep.data_ptr() and torch.equal(keep, want["i.long"])
