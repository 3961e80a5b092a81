"""Callbacks for the Trainer and their Fabric twins (Fabric calls any method named like a hook,
so a Trainer callback cannot double as a Fabric one)."""

from lightning_lowprec.callbacks.clipping import (
    ExcludeMultipliersFromClipping,
    FabricExcludeMultipliersFromClipping,
    exclude_multipliers_from_clipping,
)
from lightning_lowprec.callbacks.merge import (
    FACTORS_KEY,
    FabricMergeMultipliers,
    MergedCheckpointIO,
    MergeMultipliers,
    merge_checkpoint,
    unmerge_checkpoint,
)
from lightning_lowprec.callbacks.monitor import FabricNormMonitor, NormMonitor

__all__ = [
    "FACTORS_KEY",
    "ExcludeMultipliersFromClipping",
    "FabricExcludeMultipliersFromClipping",
    "FabricMergeMultipliers",
    "FabricNormMonitor",
    "MergeMultipliers",
    "MergedCheckpointIO",
    "NormMonitor",
    "exclude_multipliers_from_clipping",
    "merge_checkpoint",
    "unmerge_checkpoint",
]
