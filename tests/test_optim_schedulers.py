"""torch's momentum-cycling schedulers (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum``)
cycle LMD's ``momentum``, not its AdamW rule's betas (issue 20)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from lightning_lowprec import LMD, Madam, MPlusAdam


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 8) * 0.1), torch.nn.Parameter(torch.ones(8))]


def train(opt, scheduler, steps: int) -> list[float]:
    momenta = []
    for _ in range(steps):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
        momenta.append(opt.param_groups[0]["momentum"])
    return momenta


def test_one_cycle_lr_cycles_lmd_momentum():
    opt = LMD(params(), lr=1e-2, seed=0)
    scheduler = OneCycleLR(opt, max_lr=1e-2, total_steps=20, base_momentum=0.85,
                           max_momentum=0.95)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)  # max at the start
    momenta = train(opt, scheduler, 19)
    assert min(momenta) == pytest.approx(0.85, abs=1e-3)  # lowest at the peak lr
    assert momenta[-1] == pytest.approx(0.95, abs=1e-3)
    assert opt.param_groups[0]["adamw_betas"] == (0.9, 0.999) and "betas" not in opt.defaults
    # The reference: torch's own momentum optimizer under the same schedule.
    sgd = torch.optim.SGD(params(), lr=1e-2, momentum=0.9)
    reference = OneCycleLR(sgd, max_lr=1e-2, total_steps=20, base_momentum=0.85,
                           max_momentum=0.95)
    assert train(sgd, reference, 19) == pytest.approx(momenta)


def test_cycled_momentum_drives_the_update():
    """The step uses the momentum the scheduler set: an LMD built with that momentum and the
    scheduler's lr makes the same step."""
    a, b = params(), params()
    opt = LMD(a, lr=1e-2, seed=0, separate_momentum=True)
    OneCycleLR(opt, max_lr=1e-2, total_steps=20, base_momentum=0.6, max_momentum=0.7)
    group = opt.param_groups[0]
    ref = LMD(b, lr=group["lr"], momentum=group["momentum"], seed=0, separate_momentum=True)
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_cyclic_lr_cycles_lmd_momentum():
    opt = LMD(params(), lr=1e-3, seed=0)
    scheduler = CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=5, base_momentum=0.8,
                         max_momentum=0.9)
    momenta = train(opt, scheduler, 10)
    assert min(momenta) == pytest.approx(0.8) and max(momenta) == pytest.approx(0.9)
    assert opt.param_groups[0]["adamw_betas"] == (0.9, 0.999)


def test_madam_has_no_momentum_to_cycle_and_mplus_adam_cycles_its_beta1():
    with pytest.raises(ValueError, match="momentum"):
        OneCycleLR(Madam(params()), max_lr=1e-2, total_steps=10)
    opt = MPlusAdam(params(), seed=0)
    OneCycleLR(opt, max_lr=1e-2, total_steps=10, max_momentum=0.95)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)


@pytest.mark.parametrize("cls", [LMD, Madam])
def test_older_state_dict_with_betas_loads_as_adamw_betas(cls):
    opt = cls(params(), seed=0)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["betas"] = tuple(group.pop("adamw_betas")[:1]) + (0.98,)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert group["adamw_betas"] == (0.9, 0.98) and "betas" not in group


@pytest.mark.parametrize("cls", [LMD, Madam])
def test_a_group_with_the_old_name_is_refused(cls):
    with pytest.raises(ValueError, match=r"Invalid betas: \(0.9, 0.95\); expected it as "
                                         r"adamw_betas"):
        cls([{"params": params(), "betas": (0.9, 0.95)}])
    MPlusAdam([{"params": params(), "betas": (0.9, 0.95)}])  # its own betas
