"""The inline math of the compiled kernels: accuracy against float64, eager == compiled."""

from __future__ import annotations

import pytest
import torch

from lightning_lowprec.optim.base import (
    EXP_NORMAL_RANGE,
    EXP_SMALL_BOUND,
    clamp_where,
    exp_normal,
    exp_small,
    expm1_small,
)


def max_ulps(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of float32 ``got`` in units of the last place of the float32 ``exact``."""
    rounded = exact.float().abs()
    ulp = torch.nextafter(rounded, torch.tensor(float("inf"))).double() - rounded.double()
    return ((got.double() - exact).abs() / ulp).max().item()


@pytest.mark.parametrize(("fn", "exact", "bound"), [
    (exp_small, torch.exp, 0.75), (expm1_small, torch.expm1, 2.0),
])
def test_small_exponentials_are_accurate_within_their_bound(fn, exact, bound):
    x = torch.linspace(-EXP_SMALL_BOUND, EXP_SMALL_BOUND, 200_001)
    x = x[x != 0]
    assert max_ulps(fn(x), exact(x.double())) <= bound


@pytest.mark.slow
def test_exp_normal_is_accurate_and_compiles_to_the_same_bits():
    x = torch.linspace(*EXP_NORMAL_RANGE, 400_001)
    assert max_ulps(exp_normal(x), torch.exp(x.double())) <= 1.25
    compiled = torch.compile(exp_normal, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), exp_normal(x))


def test_clamp_where_is_clamp():
    x = torch.tensor([-3.0, -1.0, -0.0, 0.5, 1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    torch.testing.assert_close(clamp_where(x, -1.0, 1.0), x.clamp(-1.0, 1.0), equal_nan=True,
                               rtol=0, atol=0)
