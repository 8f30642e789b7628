"""lowbit.finite.all_finite answers as torch.isfinite(t).all() does, for every dtype and every kind of value."""

import pytest
import torch

from lowbit.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), float("-inf")])
def test_agrees_with_the_elementwise_test(dtype, special):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 4096, 100_003):
        t = torch.randn(n, generator=gen).to(dtype)
        if special is not None:
            t[int(torch.randint(n, (1,), generator=gen))] = special
        assert all_finite(t) == bool(torch.isfinite(t).all()) == (special is None)


def test_opposite_infinities_and_overflowing_sums():
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))          # their sum is NaN
    big = torch.full((4,), 3e38)                                               # finite values, an infinite sum
    assert not torch.isfinite(big.sum()) and all_finite(big)
    assert not all_finite(torch.cat([big, torch.tensor([float("nan")])]))
    half = torch.full((10_000,), 60000.0, dtype=torch.float16)                 # float16's sum would overflow
    assert all_finite(half)


def test_integers_and_empty_tensors_are_finite():
    assert all_finite(torch.arange(10, dtype=torch.int8)) and all_finite(torch.empty(0))
