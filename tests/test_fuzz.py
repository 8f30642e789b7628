"""Fuzzing and fault injection of lowbit's inputs and outputs (the cases live in tests/fuzz_cases.py).

Damaged safetensors files, checkpoints, shard indexes, GGUF files and recipes must end in a clean error (or load
to the identical model); a writer killed with SIGKILL at a random point leaves no visible partial output, and
the next write removes its leftovers; a full disk is one clear error with nothing left behind. A few seeds run
by default; `-m slow` sweeps more (benchmarks/reliability.py sweeps most and writes RELIABILITY.md).
"""

import random

import pytest

import fuzz_cases as fc

TALLY = fc.Tally()   # class -> [tried, passed] over this run, for a look with --pdb or a debugger


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tokenizer):
    return fc.make_fixtures(tmp_path_factory.mktemp("fuzz"), tokenizer)


def check(cls: str, seed, results):
    failed = TALLY.record(cls, seed, results)
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cls", list(fc.CLASSES))
def test_damaged_inputs_are_clean_errors(fx, cls, seed):
    check(cls, seed, fc.CLASSES[cls][0](fx, random.Random(seed)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 12))
@pytest.mark.parametrize("cls", list(fc.CLASSES))
def test_damaged_inputs_sweep(fx, cls, seed):
    check(cls, seed, fc.CLASSES[cls][0](fx, random.Random(seed)))


def test_truncated_default_gguf(fx):
    check("default GGUF", 0, fc.default_gguf_cases(fx, random.Random(0)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 4))
def test_default_gguf_header_flips(fx, seed):
    check("default GGUF", seed, fc.default_gguf_cases(fx, random.Random(seed), flips=True))


# seeds whose first draw kills the writer just after its temporary output appears (seed 1) or after a
# random delay (seed 0): the two kinds of kill point
@pytest.mark.parametrize("what,seed", [("quantize", 1), ("offload", 0)])
def test_killed_writer_leaves_no_partial_output(fx, what, seed):
    check(f"kill -9 {what}", seed, [fc.kill_case(fx, what, random.Random(seed), full_seconds=7.0)])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("what", ["quantize", "save", "offload"])
def test_killed_writer_sweep(fx, what, seed):
    check(f"kill -9 {what}", seed, [fc.kill_case(fx, what, random.Random(seed), full_seconds=8.0)])


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    with fc.small_tmpfs(tmp_path_factory.mktemp("disk")) as d:
        if d is None:
            pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
        yield d


@pytest.mark.parametrize("what", ["quantize", "save", "offload"])
def test_full_disk_is_one_clear_error(fx, disk, what):
    check(f"full disk {what}", 0, [fc.full_disk_case(fx, disk, what)])
