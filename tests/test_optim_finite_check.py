"""The non-finite-gradient check at its edges (issue 20 item 14): a finite gradient whose
square overflows fp32 is skipped by every rule, one whose square fits is not, and the CUDA
branch of the check (``max |g|`` squared, one ``_foreach_norm``) decides as the CPU one does.

``tests/test_optim_common.py`` covers |g| = 3e19 for every optimizer configuration; here the
internal AdamW rule is forced (``adamw="always"``) so each optimizer's copy of it is checked on
its own, with fp32 and bf16 gradients.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lowprec import LMD, Madam, MPlusAdam

OPTIMIZERS = [pytest.param(LMD, id="lmd"), pytest.param(MPlusAdam, id="mplus"),
              pytest.param(Madam, id="madam")]
HUGE = 1e20
"""Finite in fp32 and bf16; its square, 1e40, overflows fp32 (max 3.4e38)."""
LARGE = 1e19
"""Its square, 1e38, fits fp32: an ordinary (if violent) gradient."""


def build(cls, params, **kwargs):
    return cls(params, **kwargs) if cls is Madam else cls(params, seed=3, **kwargs)


def make_params(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (16,), (4, 8), (12,), (5, 5)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(device, dtype))
            for s in shapes]


def gradients(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]


def poisoned(params):
    """One step's gradients: tensor 0 holds 1e20, 1 holds -1e20, 2 a NaN, 3 an inf, 4 is
    normal. Returns the gradients and which tensors the check must skip."""
    grads = gradients(params, 50)
    grads[0].view(-1)[3] = HUGE
    grads[1].view(-1)[-1] = -HUGE
    grads[2].view(-1)[0] = float("nan")
    grads[3].view(-1)[5] = float("inf")
    return grads, [True, True, True, True, False]


def run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        if isinstance(opt, LMD):
            opt.sample_()
        for p, grad in zip(params, gradients(params, t), strict=True):
            p.grad = grad
        opt.step()


def check_skips(opt, params, grads, skip):
    """One step with ``grads``: the skipped tensors are untouched (weights, state, step
    count), the others move; then normal steps keep every weight and state finite."""
    run(opt, params, 2)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in params]
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    opt.step()
    for i, (p, b, s) in enumerate(zip(params, before, state, strict=True)):
        assert torch.equal(p.detach(), b) == skip[i], f"tensor {i}"
        assert opt.state[p]["step"] == (2 if skip[i] else 3), f"tensor {i}"
        if skip[i]:
            for key, value in s.items():
                if torch.is_tensor(value):
                    assert torch.equal(opt.state[p][key], value), (i, key)
    assert opt.skipped_steps == sum(skip)
    run(opt, params, 3, first=10)
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"tensor {i}"
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), (i, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_huge_finite_gradient_is_skipped_by_the_adamw_rule(cls, foreach, dtype):
    params = make_params(dtype=dtype)
    opt = build(cls, params, adamw="always", foreach=foreach, compiled=False)
    grads, skip = poisoned(params)
    check_skips(opt, params, grads, skip)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_huge_finite_gradient_is_skipped_by_the_optimizers_own_rule(cls):
    params = make_params()
    opt = build(cls, params, adamw="never", compiled=False)
    grads, skip = poisoned(params)
    check_skips(opt, params, grads, skip)


@pytest.mark.parametrize("adamw", ["always", "never"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_gradient_whose_square_fits_fp32_is_an_ordinary_step(cls, adamw):
    """|g| = 1e19 (square 1e38 < 3.4e38) is not skipped and leaves everything finite: the
    check flags overflow, not size."""
    params = make_params()
    opt = build(cls, params, adamw=adamw, compiled=False)
    grads = gradients(params, 50)
    grads[0].view(-1)[3] = LARGE
    check_skips(opt, params, grads, [False] * len(params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_large_low_precision_gradient_is_checked_in_slices_as_a_whole(dtype):
    """A bf16 or fp16 gradient of several ``STEP_SLICE``s is checked slice by slice (no fp32
    copy of it): a huge value or a NaN in any slice skips the tensor, and so does a sum of
    squares that overflows only across slices (four slices of 1e38 each), while three fit."""
    from lightning_lowprec.optim.base import STEP_SLICE

    p = torch.nn.Parameter(torch.zeros(4, STEP_SLICE, dtype=dtype))
    opt = Madam([p], adamw="always", compiled=False)
    large = LARGE if dtype == torch.bfloat16 else 6e4  # fp16's max is 65504
    cases = {(3, 7, HUGE): True, (2, 0, float("nan")): True, (1, 5, large): False}
    for (row, col, value), skip in cases.items():
        grad = torch.full_like(p, 1e-3)
        grad[row, col] = value
        p.grad = grad
        skipped = opt.skipped_steps
        opt.step()
        assert opt.skipped_steps - skipped == skip, (row, col, value)
    if dtype == torch.bfloat16:
        for rows, skip in ((3, False), (4, True)):
            grad = torch.zeros_like(p)
            grad[:rows, 0] = LARGE
            p.grad = grad
            skipped = opt.skipped_steps
            opt.step()
            assert opt.skipped_steps - skipped == skip, rows


@pytest.mark.cuda
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_finite_check_decides_as_the_cpu_one(cls):
    """The CUDA branch (``max |g|`` per tensor squared in fp32, one multi-tensor norm) skips
    exactly the tensors the CPU branch (fp32 sum of squares) skips, fp32 and bf16 gradients,
    for both rules, and 1e19 passes on both."""
    for dtype in (torch.float32, torch.bfloat16):
        for adamw in ("always", "never"):
            decisions = []
            for device in ("cpu", "cuda"):
                params = make_params(device, dtype)
                opt = build(cls, params, adamw=adamw, compiled=False)
                grads, skip = poisoned(params)
                grads[4].view(-1)[2] = LARGE
                check_skips(opt, params, grads, skip)
                decisions.append([opt.state[p]["skipped"] for p in params])
            assert decisions[0] == decisions[1], (dtype, adamw)
