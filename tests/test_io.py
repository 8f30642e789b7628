"""Low-level file plumbing: shard indexes stay inside their directory; atomic publishing leaves nothing behind."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir, atomic_write_text
from lowbit.io.safetensors import INDEX, read_index


def _index(d, weight_map):
    (d / INDEX).write_text(json.dumps({"weight_map": weight_map}))


def test_index_shards_inside_the_directory_are_read(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"a": torch.zeros(2)}, str(tmp_path / "sub" / "s.safetensors"))
    _index(tmp_path, {"a": "sub/s.safetensors", "b": "./t.safetensors"})
    assert read_index(tmp_path) == {"a": tmp_path / "sub" / "s.safetensors", "b": tmp_path / "t.safetensors"}
    assert read_index(tmp_path / "sub") is None                 # no index: the caller decides


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "/etc/passwd", "..", "",
                                   "link.safetensors"])
def test_index_shards_outside_the_directory_are_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"")
    os.symlink(tmp_path / "x.safetensors", model / "link.safetensors")   # a link that leads out of the directory
    _index(model, {"a.weight": "ok.safetensors", "b.weight": shard})
    with pytest.raises(LowbitError, match=f"names the shard '{shard}', which is outside"):
        read_index(model)


def test_links_into_the_hub_cache_blobs_are_followed(tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(blobs / "1234"))
    os.symlink(blobs / "1234", snapshot / "model-00001.safetensors")
    _index(snapshot, {"a": "model-00001.safetensors"})
    assert read_index(snapshot) == {"a": snapshot / "model-00001.safetensors"}


def test_corrupt_index_is_one_error(tmp_path):
    (tmp_path / INDEX).write_text('{"weight_map": ["a"]}')
    with pytest.raises(LowbitError, match="corrupt"):
        read_index(tmp_path)
    _index(tmp_path, {"a": 3})
    with pytest.raises(LowbitError, match="corrupt"):
        read_index(tmp_path)


def test_atomic_dir_publishes_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("fails halfway")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"
    with pytest.raises(LowbitError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass
    with pytest.raises(LowbitError, match="cannot write the offload directory"):
        with atomic_dir(tmp_path / "out", overwrite=True, what="the offload directory") as tmp:
            raise OSError(28, "No space left on device")
    assert (tmp_path / "out" / "f").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    atomic_write_text(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"


def test_write_safetensors_gives_the_same_bytes_in_any_process_and_what_safetensors_reads(tmp_path):
    """Every dtype of the table, a non-contiguous and an empty tensor: read back by safetensors' own loader
    equal, each starting at a multiple of its element size, and the same bytes from another process (the
    safetensors library's writer orders the metadata by a per-process hash)."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    from lowbit.io.safetensors import DTYPES, read_header, write_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{name}": (torch.randn(3, 5, generator=g) * 4).to(dtype) if dtype.is_floating_point
               else torch.randint(0, 2 if dtype == torch.bool else 100, (7,), generator=g).to(dtype)
               for name, dtype in DTYPES.items()}
    tensors["strided"] = torch.randn(4, 6, generator=g).t()
    tensors["empty"] = torch.zeros(0, 3)
    torch.save(tensors, tmp_path / "in.pt")
    write_safetensors(tensors, tmp_path / "a.safetensors", {"note": "x"})
    code = ("import sys, torch; from lowbit.io.safetensors import write_safetensors; "
            "write_safetensors(torch.load(sys.argv[1]), sys.argv[2], {'note': 'x'})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "b.safetensors")], check=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name
    assert all(e.offset % e.dtype.itemsize == 0 for e in read_header(tmp_path / "a.safetensors").values())
    with pytest.raises(LowbitError, match="'c'.*complex64"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_a_cache_published_by_another_writer_meanwhile_stays(tmp_path):
    """first_wins: the copy another process published while this one wrote is kept (replacing it would leave a
    moment with no directory at all, between the two renames, for a third process that opens it); without it
    the second copy replaces the first; an output that was there before the write is replaced either way."""
    out = tmp_path / "cache"
    with atomic_dir(out, overwrite=True, first_wins=True) as tmp:
        (tmp / "f").write_text("second")
        with atomic_dir(out, overwrite=True, first_wins=True) as other:   # the other process, faster
            (other / "f").write_text("first")
    assert (out / "f").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]          # nothing of the dropped copy left
    with atomic_dir(out, overwrite=True, first_wins=True) as tmp:              # it existed before: replaced
        (tmp / "f").write_text("again")
    assert (out / "f").read_text() == "again"
    with atomic_dir(tmp_path / "plain", overwrite=True) as tmp:
        (tmp / "f").write_text("second")
        with atomic_dir(tmp_path / "plain", overwrite=True) as other:
            (other / "f").write_text("first")
    assert (tmp_path / "plain" / "f").read_text() == "second"


def test_leftovers_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    import subprocess
    from lowbit.io.atomic import atomic_dir, atomic_write_text
    dead = subprocess.Popen(["true"])
    dead.wait()                                        # a process id that no longer runs
    stale_dir = tmp_path / f".ckpt.tmp-{dead.pid}-abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".r.json.tmp-{dead.pid}-efgh"
    stale_file.write_text("{")
    alive = tmp_path / f".ckpt.tmp-{os.getppid()}-ijkl"   # a running process's: not touched
    alive.mkdir()
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "a").write_text("1")
    atomic_write_text(tmp_path / "r.json", "{}")
    assert not stale_dir.exists() and not stale_file.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "ckpt", "r.json"])


def test_gguf_reader_reads_what_gguf_py_reads_and_is_shared_only_within_the_context(tmp_path):
    """lowbit's GGUF reader gives gguf-py's fields (same parts, same dtypes) and tensors on the default model's
    file; inside shared_readers() one reader serves every request for one version of a file, also through
    gguf-py's own name, which is restored afterwards; a rewritten file is read again."""
    import shutil

    import gguf
    import numpy as np

    from lowbit.io.gguf_reader import GGUFReader, open_reader, shared_readers
    from lowbit.models.sources import default_model_path
    path = str(default_model_path())
    want, got = gguf.GGUFReader(path), GGUFReader(path)
    assert list(got.fields) == list(want.fields)
    for key, f in want.fields.items():
        g = got.fields[key]
        assert (g.name, g.types, g.data, g.offset) == (f.name, f.types, f.data, f.offset) and len(g.parts) == len(f.parts)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(g.parts, f.parts))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in got.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in want.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(got.tensors, want.tensors))

    copy = tmp_path / "m.gguf"
    shutil.copyfile(path, copy)
    own = gguf.GGUFReader
    with shared_readers():
        first = open_reader(copy)
        assert gguf.GGUFReader(str(copy)) is first and open_reader(str(copy)) is first
        os.utime(copy, ns=(0, 0))            # another version of the file: read again
        assert open_reader(copy) is not first
    assert gguf.GGUFReader is own and open_reader(copy) is not open_reader(copy)
