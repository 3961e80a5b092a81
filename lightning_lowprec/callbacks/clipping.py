"""Gradient clipping that leaves learnable multipliers out, for runs without the plugin.

arXiv 2601.04890: clipping at 1.0 must compute the global norm over the other parameters'
gradients only and leave the multipliers unclipped; counted in the norm, the multipliers'
gradients over-clip everything else and erase their gain.
:class:`~lightning_lowprec.LowPrecisionPlugin` and :class:`~lightning_lowprec.LowPrecision`
already do this; these callbacks do it for any other precision plugin (``"32-true"``,
``"bf16-mixed"``, ``"16-mixed"``, ...).

How: Lightning clips, in the Trainer (``gradient_clip_val``) and in ``fabric.clip_gradients``,
exactly the parameters that its precision plugin's ``main_params(optimizer)`` yields, after
unscaling fp16 gradients. The callbacks replace ``main_params`` on that precision plugin
instance with one that skips parameters marked as multipliers, so everything else — both
clipping algorithms, gradient unscaling, ``error_if_nonfinite``, the returned norm — stays
Lightning's own. By value (``gradient_clip_algorithm="value"``) multipliers are left
unclipped too.

FSDP2 (``ModelParallelStrategy``): the gradients are ``DTensor`` shards, and
``torch.nn.utils.clip_grad_norm_`` reduces their norms over the ranks, so the norm is the
global one, as under DDP (``tests/test_fsdp_clipping.py``: the clipped gradients equal DDP's
to the last digits of torch's fp32 norm, the multipliers' are untouched). That needs the
multipliers still marked after sharding: :func:`~lightning_lowprec.fully_shard_blocks` marks
them again (:func:`~lightning_lowprec.fsdp.mark_sharded_multipliers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowprec.optim.groups import without_multipliers

__all__ = [
    "ExcludeMultipliersFromClipping",
    "FabricExcludeMultipliersFromClipping",
    "exclude_multipliers_from_clipping",
]


class _ParamsExceptMultipliers:
    """A precision plugin's ``main_params`` without the learnable multipliers."""

    def __init__(self, main_params: Callable[[Optimizer], Iterable[Tensor]]) -> None:
        self.main_params = main_params

    def __call__(self, optimizer: Optimizer) -> list[Tensor]:
        return without_multipliers(self.main_params(optimizer))


def exclude_multipliers_from_clipping(precision: Any) -> None:
    """Make gradient clipping through ``precision`` (a Lightning precision plugin) skip multipliers.

    Replaces ``precision.main_params`` on this instance; calling it again does nothing.
    """
    if not isinstance(precision.main_params, _ParamsExceptMultipliers):
        precision.main_params = _ParamsExceptMultipliers(precision.main_params)


class ExcludeMultipliersFromClipping(Callback):
    """Trainer callback: ``gradient_clip_val`` clips everything but the learnable multipliers.

    ``Trainer(gradient_clip_val=1.0, callbacks=[ExcludeMultipliersFromClipping()])``; not
    needed with :class:`~lightning_lowprec.LowPrecisionPlugin`, which does it already.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        exclude_multipliers_from_clipping(trainer.precision_plugin)


class FabricExcludeMultipliersFromClipping:
    """Fabric callback: ``fabric.clip_gradients`` clips everything but the multipliers.

    ``Fabric(callbacks=[FabricExcludeMultipliersFromClipping()])``; it takes effect at
    ``fabric.setup(...)`` (the ``on_after_setup`` hook). Not needed with
    :class:`~lightning_lowprec.LowPrecision`, which does it already.
    """

    def on_after_setup(self, fabric: Fabric, module: nn.Module) -> None:
        exclude_multipliers_from_clipping(fabric.strategy.precision)
