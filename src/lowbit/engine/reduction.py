"""The mean of squares over the last dimension in ATen's CPU summation order, written as explicit additions.

Why: an RMSNorm's mean(x²) must round exactly as the reference's (ATen's) or a greedy token flips now and then.
A compiled step can get that by calling ATen's kernel from the graph, but that call (boxed, with its own
TensorIterator and output) costs about 2.6 µs per norm and token on CPU, 16 µs per Gemma 3 layer (six norms).
The same additions written as tensor adds compile into the surrounding kernel: inductor keeps the order of
explicit float additions (no reassociation: it compiles without unsafe-math or contraction flags).

ATen's float sum over a contiguous row of n values (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum):
  - n >= W (W floats per vector of the kernel ATen dispatches to; 8 on x86 even where the CPU has AVX-512, as
    the sum kernel is not registered for AVX-512): the first n // W vectors are summed
    by row_sum into one vector, then a scalar starting at 0 adds the n % W trailing values, then the vector's
    W lanes in order;
  - n < W: row_sum over the single values.
  row_sum over m items: items are read as rows of 4 (ilp); the m // 4 rows go through multi_row_sum (a running
  sum per column, flushed through up to 4 levels every 16 rows), the m % 4 trailing items are added to column
  0, then columns 1..3 are added to column 0. The mean is that sum divided by n.

Which W the installed ATen uses, and whether this reproduces it bit for bit at all, is found on random rows
before it is used (`aten_width`); where nothing matches (another version), the engine keeps ATen's call.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

MAX_ITEMS = 128   # beyond this many vectors per row the explicit additions would bloat the compiled graph
WIDTHS = (8, 16, 4)   # AVX2 and DEFAULT builds, AVX-512, 128-bit vectors: tried in this order


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _add(acc, x):
    """acc + x, where acc None stands for ATen's zero-initialised accumulator (0 + x == x for the non-negative
    values summed here)."""
    return x if acc is None else acc + x


def _multi_row_sum(rows: list[torch.Tensor]):
    levels = 4
    power = max(4, _ceil_log2(len(rows)) // levels)
    step, mask = 1 << power, (1 << power) - 1
    acc = [None] * levels
    i = 0
    while i + step <= len(rows):
        for _ in range(step):
            acc[0], i = _add(acc[0], rows[i]), i + 1
        for j in range(1, levels):
            if acc[j - 1] is not None:
                acc[j], acc[j - 1] = _add(acc[j], acc[j - 1]), None
            if i & (mask << (j * power)):
                break
    for r in rows[i:]:
        acc[0] = _add(acc[0], r)
    for j in range(1, levels):
        if acc[j] is not None:
            acc[0] = _add(acc[0], acc[j])
    return acc[0]


def _row_sum(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """x [..., m·lanes] read as m items of `lanes` values: ATen's row_sum, [..., lanes]."""
    m, ilp = x.shape[-1] // lanes, 4
    rows = m // ilp
    cols = [None] * ilp
    if rows:
        grouped = x[..., :rows * ilp * lanes].unflatten(-1, (rows, ilp, lanes))
        total = _multi_row_sum([grouped[..., i, :, :] for i in range(rows)])    # [..., ilp, lanes]
        cols = [total[..., k, :] for k in range(ilp)]
    for i in range(rows * ilp, m):
        cols[0] = _add(cols[0], x[..., i * lanes:(i + 1) * lanes])
    for k in range(1, ilp):
        if cols[k] is not None:
            cols[0] = _add(cols[0], cols[k])
    return cols[0]


def mean_of_squares(x: torch.Tensor, width: int) -> torch.Tensor:
    """x.pow(2).mean(-1, keepdim=True) for float32 x, summed in ATen's order for vectors of `width` floats."""
    sq = x.pow(2)
    n = sq.shape[-1]
    if n < width:
        return _row_sum(sq, 1) / n
    vectors = n // width
    acc = _row_sum(sq[..., :vectors * width], width)                         # [..., width]
    total = None
    for k in range(vectors * width, n):
        total = _add(total, sq[..., k:k + 1])
    for lane in range(width):
        total = _add(total, acc[..., lane:lane + 1])
    return total / n


@functools.lru_cache(maxsize=None)
def aten_width(n: int) -> int | None:
    """The vector width with which mean_of_squares equals ATen's x.pow(2).mean(-1, keepdim=True) bit for bit
    on rows of n floats (random rows spanning many magnitudes, so that any change of order shows; one row and
    several), or None."""
    g = torch.Generator().manual_seed(n)
    rows = [torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
            for shape in [(1, 1, n), (7, n), (2, 3, n)]]
    for width in WIDTHS:
        if n // width <= MAX_ITEMS and all(torch.equal(mean_of_squares(x, width), x.pow(2).mean(-1, keepdim=True))
                                           for x in rows):
            return width
    return None


@contextlib.contextmanager
def aten_reductions():
    """While inductor compiles, lower mean() to ATen's own kernel instead of a generated reduction.

    The generated reduction sums in another order than ATen's, so an RMSNorm's last bit can differ from the
    reference's, and now and then that flips a greedy token. Only this lowering changes, only inside the
    engine's calls (it is swapped back at once), so other compiled code in the process is unaffected.
    """
    from torch._inductor import lowering
    op = torch.ops.aten.mean.dim
    saved = lowering.lowerings.get(op)
    lowering.lowerings[op] = lowering.fallback_handler(op, add_to_fallback_set=False)
    # torch._inductor.ir says, once per graph, that this op has no C shim. A filter, not setLevel: setLevel
    # clears the level cache of every logger in the process, twice per decoded token (about 100 µs a token)
    ir_log = logging.getLogger("torch._inductor.ir")
    ir_log.addFilter(_errors_only)
    try:
        yield
    finally:
        lowering.lowerings[op] = saved
        ir_log.removeFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
