"""``FSDPStrategy`` (FSDP1) with the plugin: one error naming FSDP2 and DDP, Fabric and Trainer.

On a GPU machine ``Fabric(strategy=FSDPStrategy(), plugins=[LowPrecision(...)])`` hands the
plugin to the strategy's precision setter (``_lazy_init_strategy``), where Lightning's generic
``TypeError`` used to come from; on CPU Lightning first refuses FSDP1 for wanting a GPU, so
these tests drive the setter exactly as the connectors do.
"""

from __future__ import annotations

import pytest
from lightning.fabric.plugins.precision import FSDPPrecision, Precision
from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
from lightning.pytorch.strategies import FSDPStrategy as TrainerFSDP

from lightning_lowprec import LowPrecision, LowPrecisionPlugin

MATCH = r"does not support FSDPStrategy.*ModelParallelStrategy.*fully_shard_blocks.*'ddp'"


def test_fabric_fsdp1_names_the_supported_strategies():
    with pytest.raises(TypeError, match=MATCH):
        FabricFSDP().precision = LowPrecision("mxfp6_e2m3")


def test_trainer_fsdp1_names_the_supported_strategies():
    with pytest.raises(TypeError, match=MATCH):
        TrainerFSDP().precision_plugin = LowPrecisionPlugin("mxfp6_e2m3")


def test_other_plugins_meet_lightnings_own_check():
    strategy = FabricFSDP()
    strategy.precision = FSDPPrecision("32-true")
    assert isinstance(strategy.precision, FSDPPrecision)
    with pytest.raises(TypeError, match="can only work with the `FSDPPrecision` plugin"):
        strategy.precision = Precision()
