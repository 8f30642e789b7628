"""argmax over the last dimension (the greedy token, the top-1 of a distribution), as a maximum per block and then
an argmax within one block.

Why: ATen's CPU argmax (and inductor's generated one) tracks an index beside every value and does not vectorize
well. Over the default model's 49,152 bfloat16 logits it took 154 µs eager and 46 µs compiled on one core, and
130 µs compiled on two (the single row split between threads): a few percent of a decode step. max(dim).indices
over an evaluation window's 511 x 49,152 log-probabilities took 8.9 ms. A maximum per block of 128 is a plain
vectorized reduction (about 6 µs compiled for one row; 2.8 ms for the window, eager), after which the argmaxes
are over 384 block maxima and one block of 128.

The result is argmax's, index for index: the first block whose maximum is the row's maximum holds the first
position of that maximum, and the argmax within it finds that position. NaN behaves as in argmax (the first NaN
wins): a block holding one has NaN as its maximum, which argmax over the blocks picks first. Columns beyond the
last whole block (vocabularies not a multiple of 128) win only with a larger value, or with a NaN where the
blocks hold none, so that ties go to the earlier position.
"""

from __future__ import annotations

import torch

BLOCK = 128


def last_dim_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1, keepdim=True), the same indices (int64)."""
    n = logits.shape[-1]
    if n < 2 * BLOCK:
        return logits.argmax(-1, keepdim=True)
    body = n - n % BLOCK
    blocks = logits[..., :body].unflatten(-1, (body // BLOCK, BLOCK))
    b = blocks.amax(-1).argmax(-1, keepdim=True)                             # the first block holding the maximum
    within = torch.gather(blocks, -2, b.unsqueeze(-1).expand(*b.shape, BLOCK)).squeeze(-2)
    best = b * BLOCK + within.argmax(-1, keepdim=True)
    if body == n:
        return best
    tail = logits[..., body:]
    t = tail.argmax(-1, keepdim=True)
    value, tail_value = torch.gather(logits, -1, best), torch.gather(tail, -1, t)
    tail_wins = (tail_value > value) | (tail_value.isnan() & ~value.isnan())
    return torch.where(tail_wins, t + body, best)
