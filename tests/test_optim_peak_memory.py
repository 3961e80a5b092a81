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
from lightning_lowprec import LMD, Madam

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_madam_single_tensor_step_peak_memory(dtype):
    """Madam's own rule one tensor at a time (the CPU default of ``compiled=False``)."""
    params = _params(dtype)
    opt = Madam(params, adamw="never", compiled=False, foreach=False)
    assert _peak_per_param(opt, params) <= _BOUND


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_madam_foreach_step_peak_memory(dtype):
    """Madam's own rule in ``torch._foreach_*`` batches."""
    params = _params(dtype)
    opt = Madam(params, adamw="never", compiled=False, foreach=True)
    assert _peak_per_param(opt, params) <= _BOUND


@pytest.mark.slow
def test_madam_compiled_step_peak_memory():
    """Madam's compiled kernel: one loop per tensor, no whole-tensor temporaries."""
    params = _params()
    opt = Madam(params, adamw="never", compiled=True)
    assert _peak_per_param(opt, params) <= _BOUND
