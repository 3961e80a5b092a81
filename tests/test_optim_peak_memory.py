"""A step's temporary memory stays within 4 bytes per parameter (issue 20, item 5).

torch's AdamW holds about 4 B/param of temporaries (``foreach``: one list of square roots);
the eager kernels here run in :func:`~lightning_lowprec.optim.base.flat_slices`, so theirs are
a few MiB whatever the tensor sizes. Measured from the profiler's CPU allocation events
(:func:`benchmarks.memory.peak_extra_bytes`) on tensors large enough that one whole-tensor
temporary would exceed the bound.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory import peak_extra_bytes
from lightning_lowprec import LMD, Madam, MPlusAdam

_BOUND = 4.0  # bytes per parameter


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1024, 2048), (512, 512), (4096,)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(dtype)
        params.append(p)
    return params


def _peak_per_param(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    opt.step()  # creates the state
    return peak_extra_bytes(opt.step) / sum(p.numel() for p in params)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [LMD, Madam])
def test_adamw_rule_step_peak_memory(cls, dtype, foreach):
    """The shared internal AdamW rule (every tensor forced onto it; M+Adam has its own), fp32
    and stochastically rounded bf16 parameters, both eager paths."""
    params = _params(dtype)
    kwargs = {"seed": 0} if cls is not Madam else {}
    opt = cls(params, adamw="always", compiled=False, foreach=foreach, **kwargs)
    assert _peak_per_param(opt, params) <= _BOUND


_MODES = {
    "single": {"compiled": False, "foreach": False},
    "foreach": {"compiled": False, "foreach": True},
    "compiled": {"compiled": True},
}
_STORAGES = [None, "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]


def _mplus_peak(storage, dtype, mode, adamw):
    if storage in ("fp8_e4m3", "fp8_e5m2") and dtype != torch.float32:
        pytest.skip("FP8 storage needs float32 parameters")
    params = _params(dtype)
    opt = MPlusAdam(params, storage=storage, adamw=adamw, seed=0, **_MODES[mode])
    return _peak_per_param(opt, params)


@pytest.mark.parametrize("adamw", ["never", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", _STORAGES)
def test_mplus_adam_single_tensor_step_peak_memory(storage, dtype, adamw):
    """M+Adam's eager single-tensor path, every storage, with and without its own AdamW rule
    (``adamw="always"``: the additive branch alone)."""
    assert _mplus_peak(storage, dtype, "single", adamw) <= _BOUND


@pytest.mark.parametrize("adamw", ["never", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", _STORAGES)
def test_mplus_adam_foreach_step_peak_memory(storage, dtype, adamw):
    """The ``torch._foreach_*`` path (was 28 B/param, 40 with bf16 parameters)."""
    assert _mplus_peak(storage, dtype, "foreach", adamw) <= _BOUND


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", _STORAGES)
def test_mplus_adam_compiled_step_peak_memory(storage, dtype):
    """The compiled kernel (FP8/FP4 rounded in slices after it)."""
    assert _mplus_peak(storage, dtype, "compiled", "never") <= _BOUND
