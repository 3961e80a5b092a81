"""Checkpoints with learnable multipliers merged in, that still resume training exactly.

With :class:`MergeMultipliers` (Trainer) or :class:`FabricMergeMultipliers` (Fabric, LitGPT)
every checkpoint file holds, under the model's normal keys, the merged weights
``W_eff = s·diag(r)·W·diag(c)``: the unmodified model class loads it with ``strict=True`` and
computes exactly what the multiplied model computed (a litgpt ``lit_model.pth`` works with
``litgpt generate`` as is). What resuming needs besides — the multipliers and an int8
correction that rebuilds each raw weight from ``W_eff`` bit for bit (see
:func:`~lightning_lowprec.multipliers.split_state_dict`) — goes under the separate top-level
key :data:`FACTORS_KEY`, which model loaders ignore. Loading the checkpoint back through the
same Trainer or Fabric puts it back together before the model sees it, so training continues
exactly as if it had never stopped.

Mechanism: both callbacks wrap the strategy's ``CheckpointIO`` in :class:`MergedCheckpointIO`,
the one place every Trainer and Fabric checkpoint passes through on its way to and from disk.
It rewrites each top-level entry of the checkpoint that is a state dict with multipliers
(``"state_dict"`` for the Trainer, whatever key the model is saved under with Fabric) and
passes everything else through, so it is harmless for models without multipliers. It can also
be given directly: ``Trainer(plugins=[MergedCheckpointIO()])``, ``Fabric(plugins=[...])``.

Size: the factors add 1 byte per multiplied weight element (a quarter of fp32 weights, a half of
bf16), plus the multiplier vectors; a weight whose correction exceeds int8 (a multiplier at 0,
an overflow) is stored raw instead. Strategies that save sharded checkpoints without a
``CheckpointIO`` (FSDP, DeepSpeed) are not covered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric import Fabric
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_lowprec.multipliers import split_state_dict, unmerged_state_dict

__all__ = [
    "FACTORS_KEY",
    "FabricMergeMultipliers",
    "MergeMultipliers",
    "MergedCheckpointIO",
    "merge_checkpoint",
    "unmerge_checkpoint",
]

FACTORS_KEY = "multiplier_factors"
"""Top-level checkpoint key of the resume factors, by the key of the state dict they belong to."""


def merge_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``checkpoint`` whose state dicts have their multipliers merged.

    Every top-level entry that is a state dict with multipliers is replaced by its merged form,
    and its resume factors go to ``checkpoint[FACTORS_KEY][entry]``. Other entries pass through.
    """
    merged = dict(checkpoint)
    factors = {}
    for key, value in checkpoint.items():
        if isinstance(value, Mapping) and key != FACTORS_KEY:
            state_dict, entry_factors = split_state_dict(value)
            if entry_factors:
                merged[key], factors[key] = state_dict, entry_factors
    if factors:
        merged[FACTORS_KEY] = factors
    return merged


def unmerge_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`merge_checkpoint` in place (exactly); return ``checkpoint``.

    A checkpoint without :data:`FACTORS_KEY` is returned unchanged.
    """
    for key, factors in checkpoint.pop(FACTORS_KEY, {}).items():
        checkpoint[key] = unmerged_state_dict(checkpoint[key], factors)
    return checkpoint


class MergedCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that merges multipliers on save and un-merges them on load.

    Args:
        checkpoint_io: the IO that reads and writes the files; default ``TorchCheckpointIO``.
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        self.checkpoint_io = checkpoint_io if checkpoint_io is not None else TorchCheckpointIO()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        self.checkpoint_io.save_checkpoint(merge_checkpoint(checkpoint), path, storage_options)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Leave map_location out unless given: the wrapped IO has its own default.
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only, **kwargs)
        return unmerge_checkpoint(checkpoint)

    def remove_checkpoint(self, path: _PATH) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def _wrap_checkpoint_io(strategy: Any) -> None:
    """Route ``strategy``'s checkpoints through :class:`MergedCheckpointIO` (once)."""
    if not isinstance(strategy.checkpoint_io, MergedCheckpointIO):
        strategy.checkpoint_io = MergedCheckpointIO(strategy.checkpoint_io)


class MergeMultipliers(Callback):
    """Trainer callback: checkpoints hold merged weights and resume exactly (see module doc).

    ``Trainer(callbacks=[MergeMultipliers()])``. Works for every checkpoint the Trainer writes
    (``ModelCheckpoint``, ``trainer.save_checkpoint``) and reads (``ckpt_path=``).
    ``LightningModule.load_from_checkpoint`` reads the file without the Trainer: it gets the
    merged weights, which load into the plain model, or into one with multipliers (these then
    restart at 1 — the same function).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _wrap_checkpoint_io(trainer.strategy)


class FabricMergeMultipliers:
    """Fabric callback: ``fabric.save`` writes merged weights, ``fabric.load`` resumes exactly.

    ``Fabric(callbacks=[FabricMergeMultipliers()])``; it takes effect at the first
    ``fabric.setup(...)`` (Fabric's ``on_after_setup`` hook, which ``setup_module`` alone does
    not fire), which is what LitGPT's scripts call. A separate class from
    :class:`MergeMultipliers` because Fabric calls any method whose name matches a hook, and the
    Trainer callback's methods expect the Trainer's arguments.
    """

    def on_after_setup(self, fabric: Fabric, module: nn.Module) -> None:
        _wrap_checkpoint_io(fabric.strategy)
