"""Optimizer state dtypes: second moments stay fp32 beside bf16 weights (issue 20), on every
kernel path, and loading widens the bf16 second moments of older checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_lowprec import LMD, Madam, MPlusAdam
from lightning_lowprec.optim.base import COMPILED_MIN_NUMEL

SECOND_MOMENTS = ("exp_avg_sq", "exp_avg_sq_mult")
GRADIENTS = [1.0] + [1e-3] * 500
"""The review's example: a bf16 ``v`` with ``beta2 = 0.999`` stays at 9.995e-4 (``0.999 * v``
rounds back to ``v``) where the EMA decays to 6.07e-4."""


def reference_v(beta2: float = 0.999) -> float:
    """The second moment after :data:`GRADIENTS`, in float64."""
    v = 0.0
    for g in GRADIENTS:
        v = beta2 * v + (1.0 - beta2) * g * g
    return v


CASES = [
    pytest.param(MPlusAdam, {"betas": (0.9, 0.999)}, ("exp_avg_sq", "exp_avg_sq_mult"),
                 id="mplus"),
    pytest.param(MPlusAdam, {"betas": (0.9, 0.999), "adamw": "always"}, ("exp_avg_sq",),
                 id="mplus-adamw-branch"),
    pytest.param(Madam, {"adamw": "never", "lr": 1e-4}, ("exp_avg_sq",), id="madam"),
    pytest.param(Madam, {"adamw": "always"}, ("exp_avg_sq",), id="madam-adamw-rule"),
    pytest.param(LMD, {"adamw": "always", "seed": 0}, ("exp_avg_sq",), id="lmd-adamw-rule"),
]
PATHS = {
    "single": {"foreach": False, "compiled": False},
    "foreach": {"foreach": True, "compiled": False},
    "compiled": {"compiled": True},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("cls", "kwargs", "keys"), CASES)
def test_bf16_parameters_keep_second_moments_that_decay(cls, kwargs, keys, path):
    """bf16 weights, ``beta2 = 0.999``: every second moment is fp32 and follows the float64 EMA
    (a bf16 one would be 65 % too large). The compiled path gets a tensor large enough for the
    compiled kernels (M+Adam's smaller tensors take ``foreach`` there)."""
    shape = (COMPILED_MIN_NUMEL // 256, 256) if path == "compiled" else (8, 16)
    p = torch.nn.Parameter(torch.full(shape, 0.5, dtype=torch.bfloat16))
    opt = cls([p], **kwargs, **PATHS[path])
    for g in GRADIENTS:
        p.grad = torch.full_like(p, g)
        opt.step()
    expected = reference_v()
    for key in keys:
        v = opt.state[p][key]
        assert v.dtype == torch.float32, key
        if key == "exp_avg_sq_mult":  # the EMA of (ln 2 * w * g)**2 at the moving weight
            continue
        torch.testing.assert_close(v.double(), torch.full_like(v, expected, dtype=torch.float64),
                                   rtol=1e-4, atol=0.0)
    assert p.dtype == torch.bfloat16


def test_mplus_adam_state_dtype_default_and_explicit():
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(8, 8))
    for param, dtype in ((p, torch.bfloat16), (q, torch.float32)):
        opt = MPlusAdam([param])
        param.grad = torch.ones_like(param)
        opt.step()
        state = opt.state[param]
        assert state["exp_avg"].dtype == dtype
        assert state["exp_avg_sq"].dtype == state["exp_avg_sq_mult"].dtype == torch.float32
    opt = MPlusAdam([p], state_dtype="bfloat16")  # an explicit dtype holds every moment
    opt.step()
    assert {v.dtype for v in opt.state[p].values() if torch.is_tensor(v)} == {torch.bfloat16}


def _build(cls, params, **kwargs):
    return cls(params, **kwargs) if cls is Madam else cls(params, seed=3, **kwargs)


@pytest.mark.parametrize("cls", [LMD, MPlusAdam, Madam])
def test_old_checkpoint_with_bf16_state_loads_widened(cls):
    """A checkpoint whose floating state was saved in bf16 (M+Adam's former default for bf16
    parameters, or any state that went through ``torch.optim.Optimizer.load_state_dict``)
    loads with fp32 second moments holding the same values, and training goes on."""
    params = [torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16) * 0.1),
              torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))]
    opt = _build(cls, params, adamw="auto")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                state[key] = value.bfloat16()
    opt2 = _build(cls, params, adamw="auto")
    opt2.load_state_dict(saved)
    for i, p in enumerate(params):
        for key, value in opt2.state[p].items():
            if not (torch.is_tensor(value) and value.is_floating_point()):
                continue
            if key in SECOND_MOMENTS or cls is not MPlusAdam:
                assert value.dtype == torch.float32, key
            assert torch.equal(value, saved["state"][i][key].to(value.dtype)), key
    for p in params:
        p.grad = torch.randn_like(p)
    opt2.step()
    assert all(torch.isfinite(p).all() for p in params)
