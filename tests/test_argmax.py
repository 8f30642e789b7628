"""lowbit.argmax: argmax's indices by block maxima, on crafted rows (ties, NaN, a tail beyond the last block)."""

import torch

from lowbit.argmax import last_dim_argmax


def _argmax_cases():
    g = torch.Generator().manual_seed(0)
    for n in (100, 256, 300, 1000, 49152, 49152 + 37):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 2, n, generator=g).to(dtype)
            x[0, 0, n // 3] = x[0, 0, n - 1] = 50            # a tie, the later one in the tail where there is one
            x[0, 1, n - 1] = 60                              # the maximum in the last column
            x[1, 0, n // 2] = float("nan")                   # a NaN wins, the first one
            x[1, 0, n - 2] = float("nan")
            x[1, 1, n - 1] = float("nan")                    # a NaN in the tail only
            x[2, 0] = float("-inf")                          # all equal: the first position
            x[2, 1, :] = 7                                   # ties everywhere
            yield x


def test_last_dim_argmax_is_argmax_index_for_index():
    for x in _argmax_cases():
        assert torch.equal(last_dim_argmax(x), x.argmax(-1, keepdim=True)), (x.shape, x.dtype)
        assert torch.equal(last_dim_argmax(x[0, 0]), x[0, 0].argmax(-1, keepdim=True))


def test_last_dim_argmax_compiled_is_argmax():
    compiled = torch.compile(last_dim_argmax, dynamic=False)
    for x in list(_argmax_cases())[-2:]:
        assert torch.equal(compiled(x), x.argmax(-1, keepdim=True))
