"""Posterior sampling under DDP: two CPU processes (gloo), started by ``ddp_spawn``.

Each rank trains on its own shard of the data; after every one of 20 steps both ranks must
hold identical medians and weights, and within every step they must train at the same sample.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import GPTModule, TokenWindows, trainer_kwargs
from test_posterior import FMT, LMDModule, assert_at_rest, sampled_params
from torch.utils.data import DataLoader

from lightning_lowprec import LowPrecisionPlugin

STEPS = 20


class DDPPosteriorModule(LMDModule):
    """Compares the ranks' samples in every training_step and their state after every step."""

    def __init__(self) -> None:
        super().__init__(lmd_seed=None)  # as users write it: the seed comes from the global RNG
        self.compared = 0

    def assert_same_on_both_ranks(self, tensors: list[torch.Tensor]) -> None:
        gathered = self.all_gather(torch.cat([t.detach().flatten() for t in tensors]))
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])

    def training_step(self, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        assert opt.holds_sample
        self.assert_same_on_both_ranks(sampled_params(opt))
        return GPTModule.training_step(self, batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        assert_at_rest(opt)
        medians = [
            opt.state[p][key]
            for p in sampled_params(opt)
            for key in ("log_median_pos", "log_median_neg")
        ]
        self.assert_same_on_both_ranks(medians + list(self.parameters()))
        self.compared += 1

    def on_train_end(self) -> None:
        assert self.trainer.world_size == 2 and self.compared == STEPS


@pytest.mark.slow  # ~20 s: two fresh processes import torch, Lightning and litgpt
def test_ddp_ranks_share_samples_and_medians_at_every_step(tokens):
    loader = DataLoader(TokenWindows(tokens, 16), batch_size=2)  # 4 steps an epoch per rank
    L.seed_everything(0)
    module = DDPPosteriorModule()
    initial = module.gpt.transformer.h[0].attn.qkv.weight.detach().clone()
    trainer = L.Trainer(
        **trainer_kwargs(
            devices=2, strategy="ddp_spawn", max_steps=STEPS, plugins=[LowPrecisionPlugin(FMT)]
        )
    )
    trainer.fit(module, loader)
    # A failed assertion in a child fails fit(); the trained weights come back to this process.
    assert not torch.equal(module.gpt.transformer.h[0].attn.qkv.weight, initial)
    assert trainer.callback_metrics["train_loss"] < 6.0
