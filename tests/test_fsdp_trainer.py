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
from lightning.pytorch.callbacks import ModelCheckpoint
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
        if sys.argv[1] != "ddp":
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
    # argv: fsdp|ddp OUT CKPT_DIR (FSDP2 saves a distributed checkpoint at step 5, the end of
    # epoch 0: 5 batches per rank), or resume OUT CKPT (FSDP2 from that checkpoint on).
    torch.set_num_threads(1)
    mode, out, ckpt = sys.argv[1:4]
    data = torch.randint(0, 4096, (40, 33), generator=torch.Generator().manual_seed(1))
    val = torch.randint(0, 4096, (16, 33), generator=torch.Generator().manual_seed(2))
    save = [ModelCheckpoint(ckpt, every_n_train_steps=5, save_top_k=-1)] if mode == "fsdp" else []
    t = L.Trainer(accelerator="cpu", devices=2, max_steps=10, logger=False,
                  enable_checkpointing=bool(save), callbacks=save, enable_progress_bar=False,
                  val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2,
                  strategy=(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                            if mode != "ddp" else "ddp"),
                  plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    m = M()
    t.fit(m, DataLoader(TensorDataset(data), batch_size=4),
          DataLoader(TensorDataset(val), batch_size=4),
          ckpt_path=ckpt if mode == "resume" else None)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in m.gpt.named_parameters()}
    if t.global_rank == 0:
        torch.save({"params": full, "modules": sorted({type(x).__name__ for x in m.modules()}),
                    "val": m.val_losses, "logged": m.logged}, out)
'''


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name}"


def run(tmp_path: Path, *args: str) -> dict:
    """The script in 2 processes (ddp-style spawn); what rank 0 saved."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / f"trainer_{args[0]}.pt"
    proc = subprocess.run([sys.executable, str(script), args[0], str(out), *args[1:]], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """The FSDP2 run of 10 steps, its checkpoint directory (step 5) and its results."""
    tmp_path = tmp_path_factory.mktemp("fsdp_trainer")
    return tmp_path, run(tmp_path, "fsdp", str(tmp_path / "checkpoints"))


@pytest.mark.slow  # ~1 min: two 2-process Trainer runs (FSDP2 and DDP) of 10 steps
def test_trainer_lmd_fsdp2_in_configure_model_equals_ddp_across_validation(uninterrupted):
    """The Trainer recipe: ``fully_shard_blocks(self.gpt, self.device_mesh)`` in
    ``configure_model``, LMD sampled, MXFP6, the sanity check and a validation loop every 3
    steps (2 batches); parameters and validation losses equal DDP's."""
    tmp_path, fsdp = uninterrupted
    ddp = run(tmp_path, "ddp", str(tmp_path / "unused"))
    assert {"FSDPGPT", "FSDPBlock", "QuantizedLinear"} <= set(fsdp["modules"])
    when = [(sanity, step) for sanity, step, _ in fsdp["val"]]
    assert when == [(True, 0)] * 2 + [(False, 3)] * 2 + [(False, 6)] * 2 + [(False, 9)] * 2
    assert fsdp["val"] == ddp["val"]
    assert len(fsdp["logged"]) == 4 and fsdp["logged"] == ddp["logged"]
    assert_same(fsdp["params"], ddp["params"], "Trainer FSDP2 vs DDP")


@pytest.mark.slow  # ~30 s: one more 2-process Trainer run of 5 steps
def test_trainer_fsdp2_resume_from_step_5_reaches_the_uninterrupted_step_10(uninterrupted):
    """``ModelCheckpoint`` (a distributed checkpoint) at step 5, ``trainer.fit(ckpt_path=...)``
    with a fresh Trainer and model: the resumed run validates at the same steps with the same
    losses and lands on exactly the uninterrupted run's step-10 parameters.

    The checkpoint is taken at the last batch of epoch 0 (``on_train_batch_end``), where the
    data order resumes as Lightning replays it; from a mid-epoch checkpoint, or one that
    ``ModelCheckpoint(save_on_train_epoch_end=True)`` writes inside ``on_train_epoch_end``,
    Lightning's loop restarts the plain DataLoader differently (the resumed run's first step
    counts as an extra batch of epoch 0), and DDP's resume then departs from its uninterrupted
    run exactly as FSDP2's does: measured, the two resumed runs stay bitwise equal."""
    tmp_path, fsdp = uninterrupted
    ckpt = tmp_path / "checkpoints" / "epoch=0-step=5.ckpt"
    assert ckpt.is_dir()  # the strategy's default: a distributed (sharded) checkpoint
    resumed = run(tmp_path, "resume", str(ckpt))
    when = [(sanity, step) for sanity, step, _ in resumed["val"]]
    assert when == [(False, 6)] * 2 + [(False, 9)] * 2  # Lightning skips the sanity check
    assert resumed["val"] == fsdp["val"][4:]
    assert_same(resumed["params"], fsdp["params"], "Trainer FSDP2 resumed vs uninterrupted")
