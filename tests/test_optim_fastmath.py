"""The inline math of the compiled kernels: accuracy against float64, eager == compiled."""

from __future__ import annotations

import pytest
import torch

from lightning_lowprec.optim.base import (
    EXP_NORMAL_RANGE,
    EXP_SMALL_BOUND,
    clamp_where,
    compiled,
    exp_normal,
    exp_small,
    expm1_small,
    flip_sign,
)


def max_ulps(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of float32 ``got`` in units of the last place of the float32 ``exact``."""
    rounded = exact.float().abs()
    ulp = torch.nextafter(rounded, torch.tensor(float("inf"))).double() - rounded.double()
    return ((got.double() - exact).abs() / ulp).max().item()


@pytest.mark.parametrize(("fn", "exact", "bound"), [
    (exp_small, torch.exp, 0.75), (expm1_small, torch.expm1, 2.0),
])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_small_exponentials_are_accurate_within_their_bound(fn, exact, bound, compile):
    """Also as the optimizers' compiled kernels run them: with fused multiply-adds."""
    x = torch.linspace(-EXP_SMALL_BOUND, EXP_SMALL_BOUND, 200_001)
    x = x[x != 0]
    assert max_ulps((compiled(fn) if compile else fn)(x), exact(x.double())) <= bound


@pytest.mark.slow
def test_exp_normal_is_accurate_eagerly_and_compiled():
    x = torch.linspace(*EXP_NORMAL_RANGE, 400_001)
    assert max_ulps(exp_normal(x), torch.exp(x.double())) <= 1.25
    assert max_ulps(compiled(exp_normal)(x), torch.exp(x.double())) <= 1.25


def test_flip_sign_negates_where_the_sign_bit_is_set():
    x = torch.tensor([1.5, -2.0, 0.0, float("inf"), 3.0, -4.0, 5.0])
    s = torch.tensor([-1.0, -3.0, -7.0, float("-inf"), -0.0, 0.0, 2.0])
    expected = torch.tensor([-1.5, 2.0, -0.0, float("-inf"), -3.0, -4.0, 5.0])
    got = flip_sign(x, s)
    assert torch.equal(got, expected)
    assert torch.equal(got.signbit(), expected.signbit())
    assert torch.equal(compiled(flip_sign)(x, s), expected)


def test_clamp_where_is_clamp():
    x = torch.tensor([-3.0, -1.0, -0.0, 0.5, 1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    torch.testing.assert_close(clamp_where(x, -1.0, 1.0), x.clamp(-1.0, 1.0), equal_nan=True,
                               rtol=0, atol=0)
