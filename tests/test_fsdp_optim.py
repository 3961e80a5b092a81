"""The optimizers on FSDP2 ``DTensor`` parameters equal the unsharded optimizers bit for bit.

Two gloo processes hold the same parameters and gradients twice: as plain tensors (the
reference, one process's view) and as ``DTensor`` shards on dim 0, the layout
``fully_shard`` gives them, including uneven shards (5 rows over 2 ranks) and an empty one
(1 row over 2 ranks). Every step's weights and optimizer state, LMD's samples and the skip
counts must be identical: elementwise work is the same arithmetic on a slice, every per-tensor
decision (RMS-based scales, all-zero routing, non-finite skip) is reduced over the shards, and
every choice of kernel is made on the whole tensor.
"""

from __future__ import annotations

import pytest
import torch
from file_spawn import spawn

from lightning_lowprec import LMD, Madam, MPlusAdam
from lightning_lowprec.optim.base import COMPILED_MIN_NUMEL

SHAPES = [(5, 7), (64, 33), (1, 8), (9,), (COMPILED_MIN_NUMEL // 128, 128), (6, 4)]
"""Uneven (3 + 2 rows), even, one row (1 + 0: an empty shard), 1-D (AdamW rule), one of
``COMPILED_MIN_NUMEL`` elements whose shards are smaller (M+Adam's compiled kernel and the
compiled gradient check are chosen by the whole tensor's size), and the last one starts all
zero (AdamW rule under ``adamw="auto"``)."""

CASES = {
    "lmd": lambda ps: LMD(ps, seed=7, lr=0.02, sigma=0.2),
    "lmd_single": lambda ps: LMD(ps, seed=7, foreach=False, separate_momentum=True,
                                 init="moment_matched", sign_beta=0.5),
    "lmd_mean_box_muller": lambda ps: LMD(ps, seed=3, point_estimate="mean", noise="box_muller",
                                          separate_momentum=True),
    "madam": lambda ps: Madam(ps, lr=0.05),
    "madam_single": lambda ps: Madam(ps, foreach=False, adamw="never"),
    "madam_bf16": lambda ps: Madam(ps, seed=4),  # the AdamW rule's stochastic rounding
    "mplus_bf16": lambda ps: MPlusAdam(ps, storage="bf16", rounding="stochastic", seed=5),
    "mplus_auto": lambda ps: MPlusAdam(ps, adamw="auto", foreach=False, seed=5),
}
COMPILED_CASES = {
    "lmd_compiled": lambda ps: LMD(ps, seed=7, compiled=True, separate_momentum=True),
    # lmd_single's options, compiled: plain tensors and shards once ran two compiled graphs
    # (with and without the shard offset) that differed in a few ulps of one element
    "lmd_single_compiled": lambda ps: LMD(ps, seed=7, compiled=True, separate_momentum=True,
                                          init="moment_matched", sign_beta=0.5),
    "mplus_compiled": lambda ps: MPlusAdam(ps, storage="bf16", rounding="stochastic", seed=5,
                                           compiled=True),
}


def initial(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) for s in SHAPES]
    tensors[-1].zero_()
    return [t.to(dtype) for t in tensors]


def gradient(step: int, shape: tuple[int, ...], index: int) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index))
    if step == 2 and index == 0:
        g[-1, -1] = float("nan")  # on rank 1's shard only: the whole tensor must skip
    return g


def same_state(got, want) -> bool:
    """Bitwise equal state; a float (Madam's ``max``, LMD's ``log_m_ref``: from an fp64 sum
    of squares whose last bits follow the order of the sum, shard sums added across ranks)
    at the fp32 precision the kernels use it in."""
    if isinstance(want, torch.Tensor):
        return torch.equal(got.full_tensor() if hasattr(got, "full_tensor") else got, want)
    if isinstance(want, float):
        return torch.tensor(got, dtype=torch.float32) == torch.tensor(want, dtype=torch.float32)
    return got == want


def run_case(name: str, build, mesh, steps: int = 4) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    plain = [torch.nn.Parameter(t.clone()) for t in initial(dtype)]
    shards = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)]))
              for t in initial(dtype)]
    ref, opt = build(plain), build(shards)
    for step in range(steps):
        for i, (a, b) in enumerate(zip(plain, shards, strict=True)):
            g = gradient(step, a.shape, i).to(dtype)
            a.grad = g.clone()
            b.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        if isinstance(ref, LMD):
            ref.sample_()
            opt.sample_()
            for a, b in zip(plain, shards, strict=True):
                assert torch.equal(a.detach(), b.detach().full_tensor()), f"{name} sample {step}"
        ref.step()
        opt.step()
        for i, (a, b) in enumerate(zip(plain, shards, strict=True)):
            assert torch.equal(a.detach(), b.detach().full_tensor()), f"{name} step {step} #{i}"
            for key, value in ref.state[a].items():  # bf16 weights can hide fp32 state ulps
                assert same_state(opt.state[b][key], value), f"{name} step {step} #{i} {key}"
            for key in ("exp_avg_sq", "exp_avg_sq_mult"):  # fp32 beside bf16 shards too
                assert opt.state[b].get(key, torch.zeros(())).dtype == torch.float32, name
    assert opt.skipped_steps == ref.skipped_steps == 1, name
    full = opt.state_dict()["state"][0]
    assert all(type(v).__name__ == "DTensor" for v in full.values() if torch.is_tensor(v)), name


def rank_main(rank: int, cases: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    for name in cases:
        run_case(name, {**CASES, **COMPILED_CASES}[name], mesh)


def test_sharded_steps_and_samples_equal_unsharded_bitwise(tmp_path):
    spawn(rank_main, tmp_path, list(CASES))


@pytest.mark.slow  # ~80 s: compiles each kernel in both processes (Madam's has no noise)
def test_compiled_kernels_on_local_shards_equal_unsharded_bitwise(tmp_path):
    spawn(rank_main, tmp_path, list(COMPILED_CASES))
