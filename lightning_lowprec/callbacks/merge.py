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

FSDP2 (``ModelParallelStrategy``, Fabric and Trainer): a *full* checkpoint
(``save_distributed_checkpoint=False``: rank 0 writes one file) is merged the same way — Fabric's
strategy has no ``CheckpointIO``, so the callback wraps its ``save_checkpoint`` (gather the full
state dicts as Lightning does, merge, write) — and loading one through the strategy un-merges
it before the shards are filled. A *distributed* checkpoint (the default: one ``torch.
distributed.checkpoint`` shard per rank) holds the multiplied layers as they are, sharded; it
resumes exactly and, like any sharded checkpoint, is not meant for the plain model. (Load a
merged full file with ``fabric.load_raw`` and the multipliers restart at 1: the same function.)

Size: the factors add 1 byte per multiplied weight element (a quarter of fp32 weights, a half of
bf16), plus the multiplier vectors; a weight whose correction exceeds int8 (a multiplier at 0,
an overflow) is stored raw instead. FSDP1 (``FSDPStrategy``) and DeepSpeed, which save without a
``CheckpointIO``, are not covered.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.fabric.strategies as fabric_strategies
import lightning.pytorch as pl
import lightning.pytorch.strategies as trainer_strategies
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim import Optimizer

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
    """Route ``strategy``'s checkpoints through :class:`MergedCheckpointIO` (once); under
    ``ModelParallelStrategy`` also its full-checkpoint save (Fabric) and load (both)."""
    if isinstance(strategy, fabric_strategies.ModelParallelStrategy):
        _merge_full_checkpoints(strategy, fabric=True)
        return
    if not isinstance(strategy.checkpoint_io, MergedCheckpointIO):
        strategy.checkpoint_io = MergedCheckpointIO(strategy.checkpoint_io)
    if isinstance(strategy, trainer_strategies.ModelParallelStrategy):
        _merge_full_checkpoints(strategy, fabric=False)  # the Trainer's load skips its IO


def _merge_full_checkpoints(strategy: Any, fabric: bool) -> None:
    """Wrap a ``ModelParallelStrategy`` instance's ``save_checkpoint`` (Fabric: it has no
    ``CheckpointIO``) and ``load_checkpoint`` (both: they read files with ``torch.load``) so that
    full checkpoints are merged on save and un-merged on load; distributed ones pass through."""
    if getattr(strategy, "_lowprec_merges", False):
        return
    strategy._lowprec_merges = True
    save, load = strategy.save_checkpoint, strategy.load_checkpoint

    def save_checkpoint(path: _PATH, state: dict[str, Any], storage_options: Any = None,
                        filter: dict[str, Any] | None = None) -> None:
        if strategy._save_distributed_checkpoint or storage_options is not None:
            save(path, state, storage_options=storage_options, filter=filter)
        else:
            _save_merged_full(strategy, Path(strategy.broadcast(path)), state, filter)

    def fabric_load(path: _PATH, state: Any = None, strict: bool = True,
                    weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = _merged_full(Path(strategy.broadcast(path)), weights_only)
        if checkpoint is None or not isinstance(state, dict):
            return load(path, state, strict=strict, weights_only=weights_only)
        return _load_full(unmerge_checkpoint(checkpoint), state, strict, from_list=False)

    def trainer_load(checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = _merged_full(Path(strategy.broadcast(checkpoint_path)), weights_only)
        if checkpoint is None:
            return load(checkpoint_path, weights_only=weights_only)
        optimizers = {f"optimizer_{i}": o for i, o in enumerate(strategy.optimizers)}
        state = {"state_dict": strategy.model, **optimizers}
        strict = strategy.lightning_module.strict_loading
        return _load_full(unmerge_checkpoint(checkpoint), state, strict, from_list=True)

    if fabric:
        strategy.save_checkpoint = save_checkpoint
        strategy.load_checkpoint = fabric_load
    else:
        strategy.load_checkpoint = trainer_load


def _save_merged_full(
    strategy: Any, path: Path, state: dict[str, Any], filter: dict[str, Any] | None
) -> None:
    """Lightning's full FSDP2 checkpoint (the full state dicts gathered to rank 0 on the CPU),
    merged, written by rank 0."""
    from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
    from lightning.fabric.strategies.model_parallel import _has_dtensor_modules
    from lightning.fabric.strategies.strategy import _apply_filter
    from lightning.fabric.utilities.types import _Stateful
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if path.is_dir() and not _is_sharded_checkpoint(path):
        raise IsADirectoryError(f"The checkpoint path exists and is a directory: {path}")
    modules = [module for module in state.values() if _has_dtensor_modules(module)]
    if len(modules) != 1:
        raise ValueError(
            f"A full FSDP2 checkpoint holds exactly one distributed (set-up) model; the state "
            f"has {len(modules)}: pass the model set up by the strategy, once."
        )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    converted: dict[str, Any] = {}
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            value = get_model_state_dict(obj, options=options)
        elif isinstance(obj, Optimizer):
            value = get_optimizer_state_dict(modules[0], obj, options=options)
        else:
            value = obj.state_dict() if isinstance(obj, _Stateful) else obj
        _apply_filter(key, filter or {}, value, converted)
    if strategy.global_rank == 0:
        if _is_sharded_checkpoint(path):
            shutil.rmtree(path)
        torch.save(merge_checkpoint(converted), path)
    strategy.barrier()


def _merged_full(path: Path, weights_only: bool | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it is a merged full file (memory-mapped), else ``None``."""
    if not path.is_file():
        return None
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    return checkpoint if isinstance(checkpoint, dict) and FACTORS_KEY in checkpoint else None


def _load_full(
    checkpoint: dict[str, Any], state: dict[str, Any], strict: bool, from_list: bool
) -> dict[str, Any]:
    """Lightning's load of a full checkpoint into an FSDP2 model and its optimizers (rank 0's
    values broadcast into every rank's shards), from an un-merged ``checkpoint``; returns what
    ``state`` did not ask for."""
    from lightning.fabric.strategies.model_parallel import (
        _has_dtensor_modules,
        _load_raw_module_state,
        _rekey_optimizer_state_if_needed,
    )
    from lightning.fabric.strategies.strategy import _validate_keys_for_strict_loading
    from lightning.fabric.utilities.load import _move_state_into
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    modules = {key: module for key, module in state.items() if _has_dtensor_modules(module)}
    if len(modules) != 1:
        raise ValueError(
            f"Loading a full FSDP2 checkpoint needs exactly one distributed (set-up) model in "
            f"the state; it has {len(modules)}."
        )
    ((module_key, module),) = modules.items()
    optimizers = {key: o for key, o in state.items() if isinstance(o, Optimizer)}
    _load_raw_module_state(checkpoint.pop(module_key), module, strict=strict)
    options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
    for index, (key, optimizer) in enumerate(optimizers.items()):
        if from_list:  # the Trainer's layout
            optimizer_state = checkpoint["optimizer_states"][index]
        else:
            optimizer_state = checkpoint.pop(key)
        optimizer_state = _rekey_optimizer_state_if_needed(optimizer_state, module)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state,
                                 options=options)
    requested = state.keys() - modules.keys() - optimizers.keys()
    _validate_keys_for_strict_loading(requested, checkpoint.keys(), strict=strict)
    _move_state_into(source=checkpoint, destination=state, keys=requested)
    return checkpoint


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
