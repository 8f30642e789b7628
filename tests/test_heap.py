"""The `lowbit` command's process keeps the memory it frees (lowbit.heap.keep_freed_memory): a tensor freed and
allocated again reuses pages already mapped instead of faulting in fresh ones. Each case runs in a new
process, since the setting is for a whole process."""

import os
import subprocess
import sys

import pytest

# allocate, touch and free a 64 MiB tensor (above glibc's largest mmap threshold), then count the page faults
# of doing it again (the median of 7 times), and once more after release_freed_memory: a fresh mapping faults
# once per 4 KiB page, about 16k times
PROBE = """
import resource, statistics, torch
from lowbit.heap import keep_freed_memory, release_freed_memory
applied = keep_freed_memory()
def faults_touching():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20)
    x.fill_(1.0)
    assert float(x.sum()) == 16 << 20
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_touching()
# the median of several: now and then a small allocation lands in the freed block and the next big one is
# placed (and faults) elsewhere, once
again = statistics.median(faults_touching() for _ in range(7))
release_freed_memory(collect=False)
print(applied, int(again), faults_touching())
"""


def _probe(heap: str | None) -> tuple[bool, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_HEAP"}
    if heap is not None:
        env["LOWBIT_HEAP"] = heap
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, again, released = out.stdout.split()
    return applied == "True", int(again), int(released)


def _glibc() -> bool:
    import ctypes
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="not glibc")
def test_kept_pages_are_reused_without_faults_and_released_on_request():
    applied, again, released = _probe(None)
    assert applied
    pages = (64 << 20) // 4096
    assert again < pages // 20, f"{again} page faults reusing a freed 64 MiB tensor (fresh: about {pages})"
    # release_freed_memory still hands everything back: the next tensor faults its pages in again
    assert released > pages // 2


@pytest.mark.skipif(not _glibc(), reason="not glibc")
def test_system_allocator_when_asked():
    applied, again, _ = _probe("system")
    assert not applied
    assert again > (64 << 20) // 4096 // 2   # glibc maps and unmaps a block this large: every page faults again


def test_a_bad_choice_is_one_line_from_the_command():
    env = {**os.environ, "LOWBIT_HEAP": "never"}
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["lowbit: error: LOWBIT_HEAP='never': give keep (the default) or system"]


def test_the_command_keeps_freed_memory_unless_given_a_memory_budget(monkeypatch):
    from lowbit import cli, heap
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    for argv, kept in ((["lowbit", "eval", "m"], True), (["lowbit", "generate", "m", "--max-memory", "1G"], False),
                       (["lowbit", "generate", "m", "--max-memory=1G"], False),
                       (["lowbit", "quantize", "m", "--stream"], False)):
        calls.clear()
        monkeypatch.setattr(sys, "argv", argv)
        assert cli.command() == 0
        assert bool(calls) == kept, argv
