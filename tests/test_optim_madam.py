"""Madam against an independent transcription of the reference (jxbz/madam) formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lowprec import Madam


class ReferenceMadam:
    """RESEARCH.md §2, written out directly: no shared code with the implementation."""

    def __init__(self, params, lr=0.01, p_scale=3.0, g_bound=10.0):
        self.params, self.lr, self.p_scale, self.g_bound = list(params), lr, p_scale, g_bound
        self.state = {}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            if p not in self.state:
                rms = math.sqrt((p * p).mean().item())
                self.state[p] = {"max": self.p_scale * rms, "step": 0,
                                 "exp_avg_sq": torch.zeros_like(p)}
            s = self.state[p]
            s["step"] += 1
            bias_correction = 1 - 0.999 ** s["step"]
            s["exp_avg_sq"] = 0.999 * s["exp_avg_sq"] + 0.001 * p.grad**2
            g_normed = p.grad / (s["exp_avg_sq"] / bias_correction).sqrt()
            g_normed[torch.isnan(g_normed)] = 0
            g_normed.clamp_(-self.g_bound, self.g_bound)
            p *= torch.exp(-self.lr * g_normed * torch.sign(p))
            p.clamp_(-s["max"], s["max"])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("lr", "p_scale", "g_bound"), [(0.01, 3.0, 10.0), (0.05, 1.5, 2.0)])
def test_fifty_steps_match_the_reference(foreach, lr, p_scale, g_bound):
    torch.manual_seed(0)
    shapes = [(32, 16), (64,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    with torch.no_grad():
        ours[0][0, :4] = ref[0][0, :4] = 0.0  # exact zeros inside a tensor stay zero
    opt = Madam(ours, lr=lr, p_scale=p_scale, g_bound=g_bound, adamw="never", foreach=foreach)
    reference = ReferenceMadam(ref, lr=lr, p_scale=p_scale, g_bound=g_bound)
    g = torch.Generator().manual_seed(1)
    for t in range(50):
        for a, b in zip(ours, ref, strict=True):
            grad = torch.randn(a.shape, generator=g) * (10.0 if t % 7 == 0 else 1.0)
            grad.view(-1)[:3] = 0.0  # zero gradients from the start: 0 / 0 -> 0
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"],
                                   rtol=1e-6, atol=0)
        assert opt.state[a]["max"] == pytest.approx(reference.state[b]["max"], rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), lr=st.floats(1e-3, 0.2))
def test_signs_never_flip_zeros_stay_and_the_clamp_holds(seed, lr):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=g)
    w[0] = 0.0
    p = torch.nn.Parameter(w.clone())
    opt = Madam([p], lr=lr, adamw="never")
    bound = 3.0 * w.square().mean().sqrt().item()
    for _ in range(100):
        p.grad = torch.randn(8, 8, generator=g) * 100
        opt.step()
    assert torch.equal(torch.sign(p), torch.sign(w))
    assert p.abs().max().item() <= bound * (1 + 1e-6)


def test_auto_sends_zero_and_one_dim_tensors_to_adamw():
    zero, bias = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))
    opt = Madam([zero, bias])
    for _ in range(3):
        zero.grad, bias.grad = torch.ones(4, 4), torch.ones(4)
        opt.step()
    assert opt.state[zero]["adamw"] and opt.state[bias]["adamw"]
    # AdamW moves them by about adamw_lr_ratio * lr per step
    torch.testing.assert_close(bias.detach(), torch.full((4,), -3 * 0.3 * 0.01), rtol=1e-4,
                               atol=0)


def test_bf16_parameters_keep_fp32_state():
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = Madam([p])
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.01, 0.5])  # inline polynomial exp / torch.exp
def test_compiled_matches_eager(lr):
    results = []
    for mode in ({"foreach": False}, {"compiled": True}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((16, 40), (40,), (3, 5, 7))]
        opt = Madam(params, adamw="never", lr=lr, **mode)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
                p.grad.view(-1)[::5] = 0.0  # the reference's 0 / 0 -> 0
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), bound=st.sampled_from([0.0, 1e-40, 0.3, 10.0, 3e38]))
def test_magnitude_clamp_is_clamp_bit_for_bit(seed, bound):
    from lightning_lowprec.optim.madam import _clamp_magnitude

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 128, (4096,),
                                                                  generator=g).float())
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])
    b = torch.tensor(bound)
    ours = _clamp_magnitude(x, b)
    ref = torch.where(x > b, b, torch.where(x < -b, -b, x))
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
