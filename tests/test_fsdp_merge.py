"""Multipliers under FSDP2 (Fabric, ``ModelParallelStrategy``, 2 gloo CPU ranks), LMD sampled,
MXFP6 forward and backward, ``FabricMergeMultipliers``:

* a distributed checkpoint (``torch.distributed.checkpoint``, the strategy's default) saved at
  step 5 resumes into a fresh model and reaches the uninterrupted run's step-10 parameters and
  optimizer state exactly (tolerance 0: the same shards, the same arithmetic);
* a full checkpoint (``save_distributed_checkpoint=False``) is merged: its ``"model"`` entry
  loads with ``strict=True`` into the plain litgpt ``GPT``, which computes exactly the logits of
  the multiplied FSDP2 model; loaded back through the strategy it resumes exactly too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from file_spawn import spawn

SAVE_AT, STEPS = 5, 10


def batch(step: int, rank: int) -> torch.Tensor:
    x = torch.randint(0, 4096, (4, 17), generator=torch.Generator().manual_seed(100 + step))
    return x[2 * rank: 2 * rank + 2]


def probe() -> torch.Tensor:
    return torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(9))


def setup(full: bool, seed: int = 0):  # noqa: ANN201
    import lightning as L
    from conftest import make_gpt
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import LMD, LowPrecision, fully_shard_blocks
    from lightning_lowprec.callbacks import FabricMergeMultipliers
    from lightning_lowprec.multipliers import add_multipliers
    from lightning_lowprec.optim import param_groups

    strategy = ModelParallelStrategy(fully_shard_blocks, data_parallel_size=2,
                                     tensor_parallel_size=1, save_distributed_checkpoint=not full)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy,
                      plugins=[LowPrecision("mxfp6_e2m3", quantize_backward=True)],
                      callbacks=[FabricMergeMultipliers()])
    fabric.launch()
    gpt = make_gpt(seed)
    add_multipliers(gpt, "paper")
    model = fabric.setup(gpt)
    optimizer = fabric.setup_optimizers(
        LMD(param_groups(model, weight_decay=0.1), lr=0.02, seed=1, sigma=0.1))
    return fabric, gpt, model, optimizer


def train(fabric, model, optimizer, rank: int, steps: range) -> None:  # noqa: ANN001
    for step in steps:
        x = batch(step, rank)
        logits = model(x[:, :-1])
        fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                          x[:, 1:].flatten()))
        optimizer.step()
        optimizer.zero_grad()


def snapshot(gpt, optimizer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every rank's full parameters and its local shards of the optimizer state."""
    out = {f"param/{n}": p.detach().full_tensor().clone() for n, p in gpt.named_parameters()}
    names = {p: n for n, p in gpt.named_parameters()}
    for p, state in optimizer.optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                local = value.to_local() if hasattr(value, "to_local") else value
                out[f"state/{names[p]}/{key}"] = local.clone()
            else:
                out[f"state/{names[p]}/{key}"] = torch.tensor(float(value))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{what}: {key}"


def rank_main(rank: int, out: str) -> None:
    out_dir = Path(out)
    dcp, full_file = out_dir / "dcp", out_dir / "full.pth"
    # the uninterrupted run, which writes the distributed checkpoint on its way
    fabric, gpt, model, optimizer = setup(full=False)
    train(fabric, model, optimizer, rank, range(SAVE_AT))
    fabric.save(dcp, {"model": model, "optimizer": optimizer, "step": SAVE_AT})
    train(fabric, model, optimizer, rank, range(SAVE_AT, STEPS))
    straight = snapshot(gpt, optimizer)
    assert (dcp / ".metadata").is_file() and dcp.is_dir()

    # resume the distributed checkpoint into a fresh model
    fabric, gpt, model, optimizer = setup(full=False, seed=7)
    state = {"model": model, "optimizer": optimizer}
    assert fabric.load(dcp, state) == {"step": SAVE_AT}
    train(fabric, model, optimizer, rank, range(SAVE_AT, STEPS))
    assert_same(snapshot(gpt, optimizer), straight, "resumed from the distributed checkpoint")

    # a full (merged) checkpoint of the same step-5 state, then resume from it
    fabric, gpt, model, optimizer = setup(full=True, seed=7)
    fabric.load(dcp, {"model": model, "optimizer": optimizer})
    fabric.save(full_file, {"model": model, "optimizer": optimizer, "step": SAVE_AT})
    model.eval()
    with torch.no_grad():
        logits = model(probe())
    model.train()
    if rank == 0:
        torch.save(logits, out_dir / "logits.pt")
    fabric, gpt, model, optimizer = setup(full=True, seed=3)
    state = {"model": model, "optimizer": optimizer}
    assert fabric.load(full_file, state) == {"step": SAVE_AT}
    train(fabric, model, optimizer, rank, range(SAVE_AT, STEPS))
    assert_same(snapshot(gpt, optimizer), straight, "resumed from the merged full checkpoint")


@pytest.mark.slow  # ~40 s: four 2-process Fabric setups, 20 FSDP2 steps in all
def test_fsdp2_checkpoints_resume_exactly_and_full_ones_are_merged(tmp_path):
    from conftest import make_gpt

    from lightning_lowprec import LowPrecision
    from lightning_lowprec.callbacks import FACTORS_KEY

    spawn(rank_main, tmp_path, str(tmp_path))
    saved = torch.load(tmp_path / "full.pth", weights_only=True)
    assert saved["step"] == SAVE_AT and FACTORS_KEY in saved
    plain = make_gpt(seed=11)
    plain.load_state_dict(saved["model"], strict=True)  # litgpt's load of lit_model.pth
    LowPrecision("mxfp6_e2m3", quantize_backward=True).convert_module(plain)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(probe()), torch.load(tmp_path / "logits.pt"))


def trainer_fit(rank: int, out: Path, ckpt_path: Path | None = None,
                merge: bool = True) -> dict[str, torch.Tensor]:
    """6 steps (2 epochs of 3 batches per rank), checkpointing at each epoch's last batch; or
    from ``ckpt_path`` on to step 6."""
    import lightning as L
    from conftest import make_gpt
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lowprec import LMD, LowPrecisionPlugin, fully_shard_blocks
    from lightning_lowprec.callbacks import MergeMultipliers
    from lightning_lowprec.multipliers import add_multipliers
    from lightning_lowprec.optim import is_multiplier, param_groups

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = make_gpt(0 if ckpt_path is None else 7)
            add_multipliers(self.gpt, "paper")

        def configure_model(self) -> None:
            fully_shard_blocks(self.gpt, self.device_mesh)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            (x,) = batch
            logits = self.gpt(x[:, :-1])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

        def configure_optimizers(self) -> LMD:
            groups = param_groups(self.gpt, weight_decay=0.1)
            # The Trainer's model.to(device) after fully_shard dropped the marks (fixed).
            assert [g["name"] for g in groups if g["name"] == "multipliers"], groups
            return LMD(groups, lr=0.02, seed=1, sigma=0.1)

        def on_train_start(self) -> None:  # clipping and the monitor see the marks too
            assert all(is_multiplier(p) for n, p in self.gpt.named_parameters()
                       if "multiplier" in n)

    callbacks: list[object] = [MergeMultipliers()] if merge else []
    if ckpt_path is None:
        # At the epoch's last batch, not in on_train_epoch_end (save_on_train_epoch_end=True):
        # from there Lightning resumes a plain DataLoader in another order (DDP alike).
        callbacks.append(ModelCheckpoint(out, save_top_k=-1, every_n_train_steps=3))
    data = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(4)).repeat(6, 1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=6, logger=False, enable_progress_bar=False,
        default_root_dir=out,
        enable_model_summary=False, callbacks=callbacks,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                       save_distributed_checkpoint=False),
        plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    module = Module()
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=2), ckpt_path=ckpt_path)
    return {n: p.detach().full_tensor().clone() for n, p in module.gpt.named_parameters()}


def trainer_main(rank: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_lowprec.callbacks import unmerge_checkpoint

    out_dir = Path(out)
    merged = out_dir / "epoch=0-step=3.ckpt"
    uninterrupted = trainer_fit(rank, out_dir)
    if rank == 0:  # the same checkpoint as Lightning writes it without the callback
        plain = unmerge_checkpoint(torch.load(merged, weights_only=False))
        torch.save(plain, out_dir / "plain.ckpt")
    dist.barrier()
    from_merged = trainer_fit(rank, out_dir, ckpt_path=merged)
    from_plain = trainer_fit(rank, out_dir, ckpt_path=out_dir / "plain.ckpt", merge=False)
    assert_same(from_merged, from_plain, "Trainer resumed from the merged vs the plain checkpoint")
    assert_same(from_merged, uninterrupted, "Trainer resumed vs uninterrupted")


@pytest.mark.slow  # ~60 s: three 2-process Trainer fits
def test_trainer_fsdp2_full_checkpoint_is_merged_and_resumes_as_lightning_does(tmp_path):
    """``MergeMultipliers`` with the Trainer's ``ModelParallelStrategy``: the checkpoint
    ``ModelCheckpoint`` writes at step 3 loads strictly into the plain GPT, and resuming from
    it reaches exactly the uninterrupted run's step-6 parameters, as does resuming from the
    unmerged checkpoint through Lightning's own loader (LMD sampled, MXFP6)."""
    from conftest import make_gpt

    from lightning_lowprec.callbacks import FACTORS_KEY

    spawn(trainer_main, tmp_path, str(tmp_path))
    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)
    assert FACTORS_KEY in saved
    assert not any("parametrizations" in k for k in saved["state_dict"])
    plain = make_gpt(seed=11)
    plain.load_state_dict({k.removeprefix("gpt."): v for k, v in saved["state_dict"].items()},
                          strict=True)
