"""Stochastic rounding of fp32 values onto the bf16 and fp16 grids, from counter-based noise.

Why: an update smaller than half a unit in the last place of a bf16 weight (``|w| * 2**-9``)
rounds away under round-to-nearest every time, so a norm weight at 1.0 with ``lr = 1e-4``
never moves. Rounding up with probability (distance to the lower neighbour) / (spacing) is
unbiased: the expected weight follows the fp32 update. The random bits are
:func:`~lightning_lowprec.optim.counter_rng.random_words` of keys the caller derives from
(seed, parameter, step), so DDP ranks with one seed round alike and a resumed run rounds as
the uninterrupted one would; a shard starting at global element ``offset`` takes that slice
of the tensor's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lowprec.optim.counter_rng import random_words

__all__ = ["STOCHASTIC_DTYPES", "round_stochastic", "stochastic_bf16"]

STOCHASTIC_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
"""The dtypes :func:`round_stochastic` rounds onto."""
_BF16_DROPPED_BITS = 0xFFFF
_UNIFORM_BITS = 24


def stochastic_bf16(w: Tensor, keys: Tensor, offset: Tensor | None = None) -> Tensor:
    """Round fp32 ``w`` to the BF16 grid stochastically: add 16 random bits, truncate.

    Rounds the magnitude up with probability (dropped bits) / 2**16 for either sign (fp32 is
    sign-magnitude), so the result is unbiased; finite values beyond BF16's max may become
    inf. Returns fp32 values on the BF16 grid (integer ops only: the compiled kernels fuse it).
    """
    bits = w.contiguous().view(torch.int32)
    noise = random_words(w.numel(), keys, offset=offset)[0].view_as(bits) & _BF16_DROPPED_BITS
    return ((bits + noise) & ~_BF16_DROPPED_BITS).view(torch.float32)


def _stochastic_fp16(w: Tensor, keys: Tensor, offset: Tensor | None) -> Tensor:
    """Round fp32 ``w`` to float16: its nearest value, or the neighbour on ``w``'s other side
    with probability (distance to the nearest) / (their spacing), from a 24-bit uniform.
    Values that overflow to inf (or NaN) stay as the plain cast gives them."""
    nearest = w.to(torch.float16)
    near = nearest.float()
    toward = torch.where(w > near, torch.inf, -torch.inf).to(torch.float16)
    other = torch.nextafter(nearest, toward)
    frac = (w - near) / (other.float() - near)  # in [0, 0.5]; NaN where nearest is inf
    words = random_words(w.numel(), keys, offset=offset)[0].view_as(w)
    u = ((words >> (32 - _UNIFORM_BITS)) & ((1 << _UNIFORM_BITS) - 1)).float()
    return torch.where(u.mul_(2.0**-_UNIFORM_BITS) < frac, other, nearest)


def round_stochastic(
    w: Tensor, dtype: torch.dtype, keys: Tensor, offset: Tensor | None = None
) -> Tensor:
    """fp32 ``w`` rounded stochastically (unbiased) onto ``dtype``'s grid, as a ``dtype``
    tensor; ``dtype`` one of :data:`STOCHASTIC_DTYPES`, ``keys`` int32 (at least 2)."""
    if dtype == torch.bfloat16:
        return stochastic_bf16(w, keys, offset).to(torch.bfloat16)
    if dtype == torch.float16:
        return _stochastic_fp16(w, keys, offset)
    raise ValueError(f"Invalid dtype: {dtype!r}; expected one of {STOCHASTIC_DTYPES}.")
