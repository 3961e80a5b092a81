"""LowPrecisionPlugin under DDP: two CPU processes (gloo), started by ``ddp_spawn``.

``ddp_spawn`` keeps the test inside pytest: the children unpickle the Trainer and the module,
train, and send the weights and logged metrics back to this process.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import GPTModule, trainer_kwargs

from lightning_lowprec import LowPrecisionPlugin, QuantizedLinear


class DDPCheckedModule(GPTModule):
    """Checks on every rank: two ranks, the layers quantized, identical weights after training."""

    def on_train_end(self) -> None:
        assert self.trainer.world_size == 2
        layers = [m for m in self.gpt.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 8 and type(self.gpt.lm_head) is torch.nn.Linear
        weights = torch.cat([p.detach().flatten() for p in self.parameters()])
        gathered = self.all_gather(weights)
        assert torch.equal(gathered[0], gathered[1])


@pytest.mark.slow  # ~20 s: two fresh processes import torch, Lightning and litgpt
def test_ddp_two_cpu_processes(loader):
    module = DDPCheckedModule()
    initial = module.gpt.transformer.h[0].attn.qkv.weight.detach().clone()
    trainer = L.Trainer(
        **trainer_kwargs(
            devices=2,
            strategy="ddp_spawn",
            max_steps=16,
            plugins=[LowPrecisionPlugin("mxfp6_e2m3")],
        )
    )
    trainer.fit(module, loader)
    # A failed assertion in a child fails fit(); the trained weights come back to this process.
    assert not torch.equal(module.gpt.transformer.h[0].attn.qkv.weight, initial)
    assert trainer.callback_metrics["train_loss"] < 6.0
