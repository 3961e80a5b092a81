"""Stochastic rounding of fp32 values onto the bf16 and fp16 grids, from counter-based noise.

Why: an update smaller than half a unit in the last place of a bf16 weight (``|w| * 2**-9``)
rounds away under round-to-nearest every time, so a norm weight at 1.0 with ``lr = 1e-4``
never moves. Rounding up with probability (distance to the lower neighbour) / (spacing) is
unbiased: the expected weight follows the fp32 update. The random bits are
:func:`~lightning_lowprec.optim.counter_rng.random_words` of keys the caller derives from
(seed, parameter, step), so DDP ranks with one seed round alike and a resumed run rounds as
the uninterrupted one would; a shard starting at global element ``offset`` takes that slice
of the tensor's bits.

The FP8 and FP4 storage grids of M+Adam are emulated in fp32 (:func:`round_to_grid`): FP8 with
one power-of-two scale per tensor that the optimizer keeps in its state and changes only when
the weights leave a band of magnitudes (:func:`fp8_scale_exponent`), FP4 with the OCP MX
block scales of :func:`~lightning_lowprec.quantize`'s ``"mxfp4_e2m1"``. Stochastic draws come
from the same counter-based words, so a slice of a tensor rounds as the whole tensor would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_lowprec.optim.counter_rng import random_words

__all__ = [
    "FP8_SCALE_RANGE", "GRIDS", "Grid", "STOCHASTIC_DTYPES", "fp8_scale_exponent",
    "nearest_bf16", "round_stochastic", "round_to_grid", "stochastic_bf16",
]

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


def nearest_bf16(w: Tensor) -> Tensor:
    """fp32 ``w`` rounded to the nearest BF16 value (ties to even), as fp32: the bits of
    ``w.to(torch.bfloat16).float()`` (NaN stays NaN), in integer ops. Why not that cast:
    Inductor drops a ``.to(bfloat16).float()`` round trip inside a compiled kernel
    (``emulate_precision_casts`` is off), so M+Adam's compiled ``storage="bf16"`` step left
    fp32 weights off the BF16 grid."""
    bits = w.contiguous().view(torch.int32)
    odd = (bits >> 16) & 1
    rounded = ((bits + (_BF16_DROPPED_BITS >> 1) + odd) & ~_BF16_DROPPED_BITS).view(torch.float32)
    return torch.where(w != w, w, rounded)  # NaN; Inductor's CPU ``isnan`` is not vectorised


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


class Grid(NamedTuple):
    """An element format's grid: ``2**(e - mbits)`` steps for binades ``e >= emin`` (one
    subnormal spacing below), saturating at ``max``; ``emax = floor(log2(max))``."""

    emin: int
    mbits: int
    max: float
    emax: int


GRIDS: dict[str, Grid] = {
    "fp8_e4m3": Grid(-6, 3, 448.0, 8),
    "fp8_e5m2": Grid(-14, 2, 57344.0, 15),
    "fp4_e2m1": Grid(0, 1, 6.0, 2),
}
"""M+Adam's storage formats: FP8 per tensor, FP4 as the MX element of ``"mxfp4_e2m1"``."""
FP8_SCALE_RANGE = (-100, 100)
"""The exponents of an FP8 storage scale: every grid value times ``2**e`` is a normal fp32."""
_MX_BLOCK = 32
_EXP_MASK = 0x7F800000
_MANT_BITS = 23
_BIAS = 127
_SIGN_BIT = -(1 << 31)
_MIN_SCALE_BITS = 1 << 22  # 2**-127, MX's smallest block scale (an fp32 subnormal)


def _pow2(e: Tensor) -> Tensor:
    """Exact ``2.0**e`` in fp32 for int32 ``e`` in [-127, 127]."""
    return ((e + _BIAS) << _MANT_BITS).clamp_(min=_MIN_SCALE_BITS).view(torch.float32)


def fp8_scale_exponent(amax: Tensor, grid: Grid, current: Tensor | None = None) -> Tensor:
    """The exponent ``e`` of an FP8 storage scale ``2**e`` (int32, 0-d) for weights of
    largest magnitude ``amax`` (fp32, 0-d), kept at ``current`` (if given) while it fits.

    The smallest ``e`` in :data:`FP8_SCALE_RANGE` with ``amax <= grid.max * 2**e`` saturates
    nothing; ``current`` is kept while it is that or one more (the weights use the top two
    binades of the grid), so the scale changes only when the largest weight doubles or halves
    past the band: rarely, and never from one step's noise. A change by a power of two
    re-encodes every stored value exactly but those that fall below the grid's normal range
    on a coarser scale (a finer one holds them all); recomputing ``max / amax`` every step
    re-rounded every weight onto a new grid instead, and weights with zero gradient drifted
    (issue 20: by 28-93 % of their RMS in 200 steps). On the device: no host synchronisation.
    """
    low, high = FP8_SCALE_RANGE
    floor_log2 = (amax.view(torch.int32) >> _MANT_BITS) - _BIAS  # -127 for 0 and subnormals
    e = (floor_log2 - grid.emax).clamp_(low, high)
    e = (e + (amax > grid.max * _pow2(e)).to(torch.int32)).clamp_(low, high)  # exact compare
    if current is None:
        return e
    return torch.where((e <= current) & (e >= current - 1), current, e)


def _round_elements(v: Tensor, grid: Grid, words: Tensor | None) -> Tensor:
    """Scaled fp32 ``v`` rounded onto ``grid``'s elements: to nearest (ties to even) without
    ``words``, else up with probability (distance to the lower neighbour) / (spacing), from
    the top 24 bits of the int32 ``words`` (unbiased to 2**-24). Grid values stay put."""
    quantum = v.abs().clamp_(min=2.0**grid.emin)
    quantum = (quantum.view(torch.int32) & _EXP_MASK).view(torch.float32) * 2.0**-grid.mbits
    if words is None:
        x = torch.round(v / quantum)
    else:
        # floor and frac as a ``where`` and the sign as one OR of its bit: the values of
        # ``floor + (u < frac)`` and ``copysign`` (x >= +0), in fewer vector instructions
        # (the compiled stochastic FP8 rounding pass measured up to 2x faster)
        x = v.abs() / quantum
        u = ((words >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24
        low = x.floor()
        x = torch.where(u < x - low, low + 1.0, low)
        x = (x.view(torch.int32) | (v.view(torch.int32) & _SIGN_BIT)).view(torch.float32)
    return (x * quantum).clamp_(-grid.max, grid.max)


def round_to_grid(
    w: Tensor, storage: str, *, exponent: Tensor | None = None, row: int | None = None,
    keys: Tensor | None = None, offset: Tensor | int | None = None,
) -> Tensor:
    """fp32 ``w`` (flat) rounded onto M+Adam's ``storage`` grid, in fp32: ``"fp8_*"`` at the
    scale ``2**exponent``, ``"fp4_e2m1"`` in MX blocks of 32 consecutive elements of rows of
    ``row`` elements (``w`` holds whole rows, or whole blocks when ``row % 32 == 0``), each
    with the power-of-two scale ``2**clamp(floor(log2 amax) - 2, -127, 127)`` of
    :func:`~lightning_lowprec.quantize` (so ``quantize(x, "mxfp4_e2m1")`` keeps the result).
    Stochastic with ``keys`` (element ``offset`` on of their stream), else to nearest even.
    """
    grid = GRIDS[storage]
    words = None if keys is None else random_words(w.numel(), keys, offset=offset)[0]
    if storage != "fp4_e2m1":
        return _round_elements(w * _pow2(-exponent), grid, words) * _pow2(exponent)
    if row % _MX_BLOCK == 0:  # whole blocks: no output buffer (a compiled caller fuses it)
        return _round_blocks(w.view(-1, _MX_BLOCK), grid, words).view(-1)
    rows, out = w.view(-1, row), torch.empty_like(w).view(-1, row)
    noise = None if words is None else words.view(-1, row)
    full = row - row % _MX_BLOCK
    for a, b in ((0, full), (full, row)):
        if b > a:
            size = min(_MX_BLOCK, b - a)
            blocks = rows[:, a:b].unflatten(1, (-1, size))
            bits = None if noise is None else noise[:, a:b].unflatten(1, (-1, size))
            out[:, a:b].unflatten(1, (-1, size)).copy_(_round_blocks(blocks, grid, bits))
    return out.view(-1)


def _round_blocks(blocks: Tensor, grid: Grid, words: Tensor | None) -> Tensor:
    """fp32 ``blocks`` (MX blocks along the last dim) rounded onto ``grid`` at each block's
    scale ``2**clamp(floor(log2 amax) - grid.emax, -127, 127)`` (see :func:`round_to_grid`)."""
    amax = blocks.abs().amax(-1, keepdim=True)
    floor_log2 = (amax.view(torch.int32) >> _MANT_BITS) - _BIAS
    e = (floor_log2 - grid.emax).clamp_(-_BIAS, _BIAS)
    bits = None if words is None else words.view_as(blocks)
    return _round_elements(blocks * _pow2(-e), grid, bits) * _pow2(e)
