"""Deciding what streams: memory sizes as people write them, and which decoder blocks stay resident under a
budget in bytes.

Everything that is not a block (embedding, final norm, lm_head) stays; blocks stay resident in order while
they fit, leaving room for two streamed blocks (the one computing and the one being read ahead). The plan is
pure arithmetic on byte counts: `offload.runtime` carries it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import LowbitError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '1.5 GiB', '800MB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise LowbitError(f"cannot read the size '{text}' (examples: 800MB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class OffloadPlan:
    """Which blocks stay resident and which stream, for a budget; sizes in bytes."""

    budget: int
    fixed_bytes: int                  # embedding, final norm, lm_head and anything else outside the blocks
    block_bytes: list[int]
    resident: list[int]               # block indices kept in memory
    streamed: list[int]               # block indices read from the store for every forward pass

    @property
    def bytes_moved_per_pass(self) -> int:
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def peak_weight_bytes(self) -> int:
        """Weights in memory at the worst moment: fixed + resident + two streamed blocks."""
        two = sorted((self.block_bytes[i] for i in self.streamed), reverse=True)[:2]
        return self.fixed_bytes + sum(self.block_bytes[i] for i in self.resident) + sum(two)

    def describe(self) -> str:
        mb = 1e6
        lines = [f"offload plan: budget {self.budget / mb:.1f} MB; always resident (embedding, norm, lm_head) "
                 f"{self.fixed_bytes / mb:.1f} MB; {len(self.resident)} blocks resident "
                 f"({sum(self.block_bytes[i] for i in self.resident) / mb:.1f} MB), {len(self.streamed)} streamed "
                 f"({self.bytes_moved_per_pass / mb:.1f} MB read per forward pass, i.e. per decoded token); "
                 f"peak weights in memory {self.peak_weight_bytes / mb:.1f} MB"]
        if self.resident:
            lines.append(f"  resident blocks: {_ranges(self.resident)}")
        if self.streamed:
            lines.append(f"  streamed blocks: {_ranges(self.streamed)}")
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def plan_offload(fixed_bytes: int, block_bytes: list[int], budget: int) -> OffloadPlan:
    """Keep blocks resident from the first on while the rest still leaves room for two streamed blocks."""
    if not block_bytes:
        raise LowbitError("the model has no decoder blocks to offload")
    largest = max(block_bytes)
    if budget < fixed_bytes + 2 * largest:
        raise LowbitError(f"memory budget {budget / 1e6:.1f} MB is too small: the parts that always stay resident "
                          f"({fixed_bytes / 1e6:.1f} MB) plus two of the largest block ({largest / 1e6:.1f} MB "
                          f"each) need {(fixed_bytes + 2 * largest) / 1e6:.1f} MB")
    if fixed_bytes + sum(block_bytes) <= budget:
        return OffloadPlan(budget, fixed_bytes, block_bytes, list(range(len(block_bytes))), [])
    resident, used = [], fixed_bytes
    for i, b in enumerate(block_bytes):
        rest = block_bytes[i + 1:]
        window = sum(sorted(rest, reverse=True)[:2])
        if used + b + window > budget or not rest:
            break
        resident.append(i)
        used += b
    streamed = [i for i in range(len(block_bytes)) if i not in resident]
    return OffloadPlan(budget, fixed_bytes, block_bytes, resident, streamed)


def budget_bytes(budget: int | float | str) -> int:
    """A budget given as bytes or as text ('2GB') -> bytes."""
    return parse_size(budget) if isinstance(budget, str) else int(budget)
