"""Spare buffers: under gradient accumulation, one optimizer step's sample is drawn once.

The plugin writes the posterior sample into the parameters before every training forward and
the point estimate back after every backward (Lightning hooks run between micro-batches and
must see the point estimate). With ``N`` micro-batches per step that is ``N`` samples (two
counter hashes and two ``exp`` per element) and ``N`` point estimates (two ``exp``), all of
the same values. A :class:`Spare` holds whichever of the two values the parameter does not,
so that after the first draw of a step each switch is a swap of two buffers (three copies of
cache-sized chunks) instead.

The optimizer allocates a parameter's spare at its first *re*-draw within a step (so a run
without accumulation never pays its memory: one element of the parameter's dtype per element,
4 bytes per fp32 parameter) and keeps it from then on; what it holds is valid until the
parameter's log-medians or the parameter itself change (an optimizer step, a write that the
optimizer adopts, a predictive draw, ``load_state_dict``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Spare", "swap_"]

Holds = Literal["sample", "point"] | None
_SWAP_CHUNK = 1 << 16
"""Elements per chunk of :func:`swap_`: the temporary (256 KiB in fp32) and both chunks stay
in the L2 cache for the three copies."""


class Spare:
    """One parameter's (or local shard's) spare buffer and what it holds: ``"sample"`` (this
    step's training sample, while the parameter holds the point estimate), ``"point"`` (the
    point estimate, while the parameter holds the sample) or ``None`` (nothing valid).
    ``version`` is the parameter's version counter when it last held the optimizer's own
    sample: a write since (by anyone else) shows as a different version."""

    __slots__ = ("buffer", "holds", "version")

    def __init__(self, like: Tensor) -> None:
        self.buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.holds: Holds = None
        self.version = -1

    def stash_(self, values: Tensor, holds: Holds) -> None:
        """Copy ``values`` (what the parameter holds now) into the buffer, as ``holds``."""
        self.buffer.copy_(values)
        self.holds = holds

    def swap_(self, target: Tensor) -> None:
        """Exchange the buffer's values with ``target``'s; ``holds`` flips to what ``target``
        held."""
        swap_(target, self.buffer)
        self.holds = "point" if self.holds == "sample" else "sample"
        if self.holds == "point":
            self.version = target._version


def swap_(a: Tensor, b: Tensor) -> None:
    """Exchange the values of ``a`` and ``b`` (same shape and dtype) in place, through a
    temporary of at most ``_SWAP_CHUNK`` elements when both are contiguous."""
    if not (a.is_contiguous() and b.is_contiguous()) or a.numel() <= _SWAP_CHUNK:
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
        return
    fa, fb = a.view(-1), b.view(-1)
    tmp = torch.empty(_SWAP_CHUNK, dtype=a.dtype, device=a.device)
    for start in range(0, fa.numel(), _SWAP_CHUNK):
        ca, cb = fa[start:start + _SWAP_CHUNK], fb[start:start + _SWAP_CHUNK]
        t = tmp[: ca.numel()]
        t.copy_(ca)
        ca.copy_(cb)
        cb.copy_(t)
