"""The Trainer recipe for FSDP2: ``ModelParallelStrategy`` with ``fully_shard_blocks`` called in
``configure_model`` (the plugin has converted the layers by then), LMD sampled, MXFP6 — 10 steps
on 2 gloo ranks, with a validation loop every 3 steps and the sanity check before training,
land on exactly DDP's parameters and validation losses (with 2 ranks a gradient sum is one
commutative fp32 addition, so the tolerance is 0).

Why validation matters: after a forward without backward FSDP2 keeps the root module's
parameters gathered, and the next forward skips the all-gather; the training step after a
validation loop must still run at its own sample, not at that stale copy of the point
estimate (before the fix the FSDP2 run left DDP's at the first step after the sanity check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TRAINER_SCRIPT = '''
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from litgpt import GPT, Config
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowprec import LMD, LowPrecisionPlugin, fully_shard_blocks


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096,
                                        n_layer=2, block_size=32))
        self.val_losses, self.logged = [], []

    def configure_model(self):
        if sys.argv[1] == "fsdp":
            fully_shard_blocks(self.gpt, self.device_mesh)

    def loss(self, batch):
        (x,) = batch
        logits = self.gpt(x[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    def training_step(self, batch, _):
        loss = self.loss(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, _):
        # Evaluation runs at the point estimate: no optimizer holds a sample.
        assert not self.trainer.optimizers or not self.trainer.optimizers[0].holds_sample
        loss = self.loss(batch)
        self.log("val_loss", loss)
        self.val_losses.append((self.trainer.sanity_checking, self.global_step, loss.item()))

    def on_validation_epoch_end(self):
        self.logged.append(self.trainer.callback_metrics["val_loss"].item())

    def configure_optimizers(self):
        return LMD(self.parameters(), seed=7, lr=0.02, sigma=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = torch.randint(0, 4096, (40, 33), generator=torch.Generator().manual_seed(1))
    val = torch.randint(0, 4096, (16, 33), generator=torch.Generator().manual_seed(2))
    t = L.Trainer(accelerator="cpu", devices=2, max_steps=10, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2,
                  strategy=(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                            if sys.argv[1] == "fsdp" else "ddp"),
                  plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    m = M()
    t.fit(m, DataLoader(TensorDataset(data), batch_size=4),
          DataLoader(TensorDataset(val), batch_size=4))
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in m.gpt.named_parameters()}
    if t.global_rank == 0:
        torch.save({"params": full, "modules": sorted({type(x).__name__ for x in m.modules()}),
                    "val": m.val_losses, "logged": m.logged}, sys.argv[2])
'''


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name}"


@pytest.mark.slow  # ~2 min: two 2-process Trainer runs (FSDP2 and DDP) of 10 steps
def test_trainer_lmd_fsdp2_in_configure_model_equals_ddp_across_validation(tmp_path):
    """The Trainer recipe: ``fully_shard_blocks(self.gpt, self.device_mesh)`` in
    ``configure_model``, LMD sampled, MXFP6, the sanity check and a validation loop every 3
    steps (2 batches); parameters and validation losses equal DDP's."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("fsdp", "ddp"):
        out = tmp_path / f"trainer_{mode}.pt"
        proc = subprocess.run([sys.executable, str(script), mode, str(out)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[mode] = torch.load(out, weights_only=False)
    fsdp, ddp = results["fsdp"], results["ddp"]
    assert {"FSDPGPT", "FSDPBlock", "QuantizedLinear"} <= set(fsdp["modules"])
    when = [(sanity, step) for sanity, step, _ in fsdp["val"]]
    assert when == [(True, 0)] * 2 + [(False, 3)] * 2 + [(False, 6)] * 2 + [(False, 9)] * 2
    assert fsdp["val"] == ddp["val"]
    assert len(fsdp["logged"]) == 4 and fsdp["logged"] == ddp["logged"]
    assert_same(fsdp["params"], ddp["params"], "Trainer FSDP2 vs DDP")
