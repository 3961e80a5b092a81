"""Optimizers for low-precision training: LMD, M+Adam, Madam, and the parameter-group helper.

All three are ``torch.optim.Optimizer``s with param groups, closures, ``state_dict`` round
trips, ``foreach`` and ``compiled`` paths, validated hyperparameters, and a non-finite gradient
skips that parameter's step (counted in ``optimizer.skipped_steps``, with a rate-limited
warning naming it; ``nonfinite="raise"`` raises instead) rather than entering state.
"""

from lightning_lowprec.optim.groups import (
    MULTIPLIER_ATTR,
    is_multiplier,
    mark_multiplier,
    param_groups,
)
from lightning_lowprec.optim.lmd import LMD
from lightning_lowprec.optim.madam import Madam
from lightning_lowprec.optim.mplus_adam import MPlusAdam

__all__ = [
    "LMD",
    "MULTIPLIER_ATTR",
    "MPlusAdam",
    "Madam",
    "is_multiplier",
    "mark_multiplier",
    "param_groups",
]
