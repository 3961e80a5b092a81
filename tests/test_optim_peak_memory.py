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


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", [LMD, Madam, MPlusAdam])
def test_bf16_gradient_finite_check_takes_no_fp32_copy(cls, foreach):
    """One large bf16 tensor: the shared non-finite check converted its whole gradient to
    fp32 first (4.0 B/param, the step's peak; issue 20, item 5); in slices it holds 0.25."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(2048, 2048, generator=g) * 0.02).bfloat16())
    p.grad = (torch.randn(2048, 2048, generator=g) * 1e-3).bfloat16()
    kwargs = {"seed": 0} if cls is not Madam else {}
    opt = cls([p], compiled=False, foreach=foreach, **kwargs)
    assert _peak_per_param(opt, [p]) <= _BOUND
    check = peak_extra_bytes(lambda: opt._finite_grads([p], [False])) / p.numel()
    assert check <= 0.5


def _large_params() -> list[torch.nn.Parameter]:
    """One 4M-element matrix (a whole-tensor fp32 temporary of it is 3.6 B per parameter of
    the set, so two exceed the bound) and a smaller one; both on LMD's own rule."""
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in [(2048, 2048), (515, 1024)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


_LMD_OPTIONS = {
    "default": {},
    "separate_momentum_drawn": {"separate_momentum": True},
    "sign_beta": {"sign_beta": 0.5},
    "point_estimate_mean": {"point_estimate": "mean"},
}


@pytest.mark.parametrize("path", [{"compiled": False, "foreach": False},
                                  {"compiled": False, "foreach": True}])
@pytest.mark.parametrize("options", list(_LMD_OPTIONS))
def test_lmd_eager_step_peak_memory(options, path):
    """LMD's own eager step, single-tensor and ``foreach``, runs in slices: a few MiB of
    temporaries (the drawn sample's noise of ``separate_momentum`` included) instead of
    18-33 B/param as whole tensors (measured before slicing)."""
    params = _large_params()
    opt = LMD(params, seed=0, **path, **_LMD_OPTIONS[options])
    opt.step()  # creates the state
    if options == "separate_momentum_drawn":
        opt.sample_()  # the step then regenerates this sample's noise
    assert peak_extra_bytes(opt.step) / sum(p.numel() for p in params) <= _BOUND


def test_lmd_eager_slices_equal_the_whole_tensor_bitwise():
    """The sliced eager step gives the values the whole-tensor one does: a non-contiguous
    parameter (no flat view to slice) takes the step whole, a contiguous one in slices, and
    the slices' noise starts at their offset in the tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 515, generator=g) * 0.02  # 2 slices and a partial one
    grads = [torch.randn(1024, 515, generator=g) * 1e-3 for _ in range(3)]
    for foreach in (False, True):
        for options in _LMD_OPTIONS.values():
            whole = torch.nn.Parameter(w.t().contiguous().t())  # same values, transposed layout
            sliced = torch.nn.Parameter(w.clone())
            assert not whole.is_contiguous()
            for p in (whole, sliced):
                opt = LMD([p], seed=1, sigma=0.2, compiled=False, foreach=foreach, **options)
                for grad in grads:
                    p.grad = grad.t().contiguous().t() if p is whole else grad.clone()
                    opt.sample_()
                    opt.step()
            assert torch.equal(whole, sliced), (foreach, options)


@pytest.mark.slow
def test_lmd_compiled_step_peak_memory():
    """The compiled step is one fused loop per tensor: no whole-tensor temporaries
    (0.01 B/param measured)."""
    params = _large_params()
    opt = LMD(params, seed=0, compiled=True)
    opt.step()  # creates the state and compiles
    assert peak_extra_bytes(opt.step) / sum(p.numel() for p in params) <= _BOUND

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
