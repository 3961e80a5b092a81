"""Gradient clipping leaves learnable multipliers out: with the plugin, and with the callbacks.

Each run gives every multiplier a gradient of 1e6 right before clipping. Clipping at
MAX_NORM must then scale the other gradients to exactly that norm and leave the multipliers'
gradients as they are; counted in the norm, the multipliers would shrink everything else by
a factor of about 1e-9 (the control runs show it).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TokenWindows, make_gpt, trainer_kwargs
from test_callbacks_merge import MultipliedGPT
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowprec import LowPrecision, LowPrecisionPlugin
from lightning_lowprec.callbacks import (
    ExcludeMultipliersFromClipping,
    FabricExcludeMultipliersFromClipping,
)
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim.groups import is_multiplier

HUGE = 1e6
MAX_NORM = 0.05  # below the matrices' natural gradient norm (~1 at init), so clipping acts


def gradients(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clones of (the other parameters' gradients, the multipliers' gradients)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return (
        [p.grad.clone() for p in params if not is_multiplier(p)],
        [p.grad.clone() for p in params if is_multiplier(p)],
    )


def make_multiplier_gradients_huge(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if is_multiplier(p):
                p.grad.fill_(HUGE)


def norm(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


def assert_multipliers_excluded(before, after) -> None:
    (others_before, mult_before), (others_after, mult_after) = before, after
    assert norm(others_before) > 10 * MAX_NORM
    # fp32 norms of ~1M gradients agree to ~1e-4 only, whichever summation order.
    assert norm(others_after) == pytest.approx(MAX_NORM, rel=1e-3)
    scale = MAX_NORM / norm(others_before)
    for b, a in zip(others_before, others_after, strict=True):
        torch.testing.assert_close(a, b * scale, rtol=1e-3, atol=0)
    # the multipliers: unclipped
    assert all(torch.equal(a, b) for a, b in zip(mult_before, mult_after, strict=True))


def assert_multipliers_included(before, after) -> None:
    (others_before, _), (others_after, mult_after) = before, after
    assert norm(others_after) < 1e-6 * norm(others_before)
    assert all(torch.all(g < HUGE) for g in mult_after)


class ClipProbe(MultipliedGPT):
    """Records the gradients right before clipping and right after the optimizer step."""

    def on_before_optimizer_step(self, optimizer):
        make_multiplier_gradients_huge(self)
        self.before = gradients(self)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after = gradients(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("setup", ["plugin", "callback", "neither"])
def test_trainer_clipping(setup, tokens):
    extra = {
        "plugin": {"plugins": [LowPrecisionPlugin("mxfp8_e4m3")]},
        "callback": {"callbacks": [ExcludeMultipliersFromClipping()]},
        "neither": {},
    }[setup]
    module = ClipProbe()
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, gradient_clip_val=MAX_NORM, **extra))
    trainer.fit(module, DataLoader(TokenWindows(tokens, 4), batch_size=4))
    if setup == "neither":
        assert_multipliers_included(module.before, module.after)
    else:
        assert_multipliers_excluded(module.before, module.after)


@pytest.mark.parametrize("setup", ["plugin", "callback", "neither"])
def test_fabric_clip_gradients(setup, tokens):
    extra = {
        "plugin": {"plugins": [LowPrecision("mxfp8_e4m3")]},
        "callback": {"callbacks": [FabricExcludeMultipliersFromClipping()]},
        "neither": {},
    }[setup]
    fabric = L.Fabric(accelerator="cpu", devices=1, **extra)
    gpt = make_gpt()
    add_multipliers(gpt)
    model, optimizer = fabric.setup(gpt, torch.optim.SGD(gpt.parameters(), lr=0.0))
    inputs, targets = TokenWindows(tokens, 1)[0]
    loss = F.cross_entropy(model(inputs[None]).flatten(0, 1), targets)
    fabric.backward(loss)
    make_multiplier_gradients_huge(gpt)
    before = gradients(gpt)
    total = fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)
    after = gradients(gpt)
    if setup == "neither":
        assert_multipliers_included(before, after)
    else:
        assert total.item() == pytest.approx(norm(before[0]), rel=1e-3)  # the norm it clipped
        assert_multipliers_excluded(before, after)
