"""Counter-based random numbers: a pure function of (keys, element index), no generator state.

Why not ``torch.randn``: a posterior optimizer must draw *the same* sample on every DDP rank,
for every gradient-accumulation micro-batch of a step and again after a resume, so its noise
has to be a function of the optimizer's state (seed, step, tensor) rather than of a global
generator. It must also be cheap: on CPU one ``torch.randn_like`` pass over the parameters
costs 7x a fused AdamW step, and Inductor's CPU ``randn`` is slower still, while the integer
hash below fuses into the surrounding element-wise kernel under ``torch.compile``.

Construction. Each element ``i`` of a tensor gets ``y = H(i ^ ka)`` and one 32-bit word per
stream ``s``: ``x_s = H(y ^ k_s)``, where ``H`` is Chris Wellons' ``lowbias32`` integer hash
(a bijection of the 32-bit words with near-ideal avalanche) and ``ka, k_s`` are keys derived
from (seed, tensor index, step, stream) by :func:`derive_keys`. Because both keys change with
the step and the tensor, two different (tensor, step) pairs never produce shifted or permuted
copies of each other, which a single XOR- or add-keyed counter would.

Arithmetic is int32 with two's-complement wrap-around (what eager CPU/CUDA kernels and
Inductor's generated code do) and logical right shifts written as arithmetic shift + mask, so
eager and compiled results are bit-identical.

Normals. ``"irwin_hall"`` (the default) sums the four bytes of one word: mean 510, variance
4 * (256**2 - 1) / 12, standardised to mean 0 and std 1; its support is bounded,
``|xi| <= 3.4506``, with kurtosis 2.7 instead of 3 (slightly light tails: ``P(|xi| > 3)`` is
0.12 % instead of 0.27 %). Bounded noise is harmless for a multiplicative ``exp(sigma * xi)``
and costs a handful of integer ops; its arithmetic is exact, so eager and compiled agree bit
for bit. ``"box_muller"`` turns the two words of an element into two exact normals (24-bit
uniforms; ``|xi| <= 5.77``) at the price of a log, a sqrt, a sin and a cos per pair.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NOISE_KINDS", "derive_keys", "fold_high", "hash32", "irwin_hall_pair_", "normal_pair",
    "random_words",
]

NoiseKind = Literal["irwin_hall", "box_muller"]
NOISE_KINDS: tuple[str, ...] = ("irwin_hall", "box_muller")

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_IRWIN_HALL_MEAN = 4 * 255 / 2
_IRWIN_HALL_STD = math.sqrt(4 * (256**2 - 1) / 12)
_LOW_BITS = 30
"""Element indices are hashed as int32: an index ``i >= 2**30`` is split into ``i mod 2**30``
and ``i >> 30``, the high part folded into the key, so any tensor size works."""


def _mix32(x: int) -> int:
    """``lowbias32`` on a Python int (the scalar twin of :func:`hash32`), result in [0, 2**32)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    x ^= x >> 16
    return x


def _signed32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def derive_keys(seed: int, *words: int, count: int = 3) -> list[int]:
    """``count`` int32 keys (as signed Python ints) for the stream named by ``seed, *words``.

    Every word is folded in through the hash, so keys for different (seed, tensor, step,
    purpose) tuples are unrelated. ``seed`` may be any Python int (its low 64 bits count).
    """
    k = _mix32((seed & _MASK32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & _MASK32))
    for w in words:
        k = _mix32(k ^ _mix32((w & _MASK32) ^ 0x85EBCA6B))
    return [_signed32(_mix32(k ^ ((0x27D4EB2F * (j + 1)) & _MASK32))) for j in range(count)]


def hash32(x: Tensor) -> Tensor:
    """``lowbias32`` on an int32 tensor (two's-complement wrap-around, logical shifts).

    ``x`` is not modified; the work is done in place on one new tensor, since on CPU every
    fresh large tensor costs as much as a pass over it (page faults).
    """
    x = x ^ (x >> 16).bitwise_and_(0xFFFF)
    x.mul_(_signed32(_MUL1))
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_signed32(_MUL2))
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def _hash32_(x: Tensor, tmp: Tensor) -> Tensor:
    """:func:`hash32` of ``x`` in place, with ``tmp`` (int32, ``x``'s shape) as its scratch:
    the same eleven passes, no new tensor."""
    for shift, mask, mul in ((16, 0xFFFF, _MUL1), (15, 0x1FFFF, _MUL2), (16, 0xFFFF, None)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_(mask))
        if mul is not None:
            x.mul_(_signed32(mul))
    return x


def random_words(
    numel: int, keys: Tensor, streams: int = 1, offset: int | Tensor | None = None
) -> list[Tensor]:
    """``streams`` int32 tensors of ``numel`` random 32-bit words each, for the elements
    ``offset .. offset + numel - 1`` of a longer vector: a chunk or a shard of a larger tensor
    gets exactly its slice of the whole tensor's words.

    Args:
        numel: number of elements (element ``i`` gets the same words whatever ``numel`` is).
        keys: int32 tensor of at least ``streams + 1`` keys from :func:`derive_keys`, on the
            device the words are wanted on (a tensor, so a compiled caller does not recompile
            when the keys change).
        offset: index of the first element (``None``: 0) — an int (an eager chunk), or an
            int64 scalar tensor (a shard's global offset, so a compiled caller does not
            recompile per shard). The split index path below gives every index the words the
            int32 path does. An int32 scalar tensor is the low part ``offset mod 2**30`` of a
            range that stays below the next multiple of ``2**30``, with ``keys[0]`` already
            folded by :func:`fold_high` (the compiled sample: one hash and no int64 index per
            element fewer, same words).
    """
    if isinstance(offset, Tensor) and offset.dtype == torch.int32:
        index = torch.arange(numel, dtype=torch.int32, device=keys.device).add_(offset)
        y = hash32(index.bitwise_xor_(keys[0]))
    elif isinstance(offset, Tensor):
        index = torch.arange(numel, dtype=torch.int64, device=keys.device).add_(offset)
        high = (index >> _LOW_BITS).to(torch.int32)
        low = (index & ((1 << _LOW_BITS) - 1)).to(torch.int32)
        y = hash32(low ^ hash32(high + keys[0]))
    elif (start := offset or 0) + numel <= 1 << _LOW_BITS:
        index = torch.arange(start, start + numel, dtype=torch.int32, device=keys.device)
        y = hash32(index.bitwise_xor_(hash32(keys[0])))
    else:
        index = torch.arange(start, start + numel, dtype=torch.int64, device=keys.device)
        high = (index >> _LOW_BITS).to(torch.int32)
        low = (index & ((1 << _LOW_BITS) - 1)).to(torch.int32)
        y = hash32(low ^ hash32(high + keys[0]))
    return [hash32(y ^ keys[s + 1]) for s in range(streams)]


def fold_high(keys: list[int], offset: int, numel: int) -> tuple[list[int], int] | None:
    """``(keys', low)`` such that ``random_words(numel, keys', offset=low)`` with ``low`` as an
    int32 tensor gives the words of elements ``offset ..`` under ``keys``: ``keys'[0]`` is
    ``hash32(offset // 2**30 + keys[0])``, the per-element hash of the index's high part
    hoisted out of the element loop. ``None`` when the range crosses a multiple of ``2**30``."""
    high, low = offset >> _LOW_BITS, offset & ((1 << _LOW_BITS) - 1)
    if low + numel > 1 << _LOW_BITS:
        return None
    return [_signed32(_mix32(high + keys[0])), *keys[1:]], low


def _irwin_hall(x: Tensor) -> Tensor:
    """The standardised sum of the four bytes of ``x``, added pairwise in 16-bit lanes (``x``
is not modified)."""
    pairs = (x & 0x00FF00FF).add_((x >> 8).bitwise_and_(0x00FF00FF))
    # The two lanes added in the high half by one multiply (see irwin_hall_pair_).
    total = pairs.mul_(0x10001).bitwise_right_shift_(16)
    return total.to(torch.float32).sub_(_IRWIN_HALL_MEAN).mul_(1.0 / _IRWIN_HALL_STD)


def irwin_hall_pair_(out: Tensor, keys: Tensor, offset: int, work: Tensor) -> Tensor:
    """``torch.stack(normal_pair(n, keys, "irwin_hall", offset))``, bit for bit, written into
    ``out`` (float32, shape ``(2, n)``) with ``work`` (int32, the same shape) as scratch, and
    returned: the eager sample's noise without a new tensor per pass (on CPU a fresh
    temporary costs about as much as a pass over it) and with both streams in one pass each.

    ``offset .. offset + n - 1`` must not cross a multiple of ``2**30`` (the index's high part
    is then one key, hashed once as :func:`fold_high` does); ``offset`` is a Python int.
    """
    n = out.shape[1]
    high, low = offset >> _LOW_BITS, offset & ((1 << _LOW_BITS) - 1)
    if low + n > 1 << _LOW_BITS:
        raise ValueError(f"elements {offset}..{offset + n - 1} cross a multiple of 2**30")
    # Words: y = H(index ^ H(high + k0)), then x_s = H(y ^ k_s) for both streams at once.
    y, words = work[0], out.view(torch.int32)
    torch.arange(low, low + n, dtype=torch.int32, device=out.device, out=y)
    y.bitwise_xor_(hash32(keys[:1] + _signed32(high & _MASK32)))
    _hash32_(y, work[1])
    torch.bitwise_xor(y, keys[1:3, None], out=words)
    _hash32_(words, work)
    # Irwin-Hall: byte pairs in 16-bit lanes, then the lanes added into the high half by one
    # multiply (the sum, <= 1020, never reaches the sign bit), minus the mean, exactly, in
    # int32; the conversion to float32 writes over the words in place (a same-size copy).
    odd = torch.bitwise_right_shift(words, 8, out=work).bitwise_and_(0x00FF00FF)
    total = words.bitwise_and_(0x00FF00FF).add_(odd).mul_(0x10001).bitwise_right_shift_(16)
    return out.copy_(total.sub_(int(_IRWIN_HALL_MEAN))).mul_(1.0 / _IRWIN_HALL_STD)


def normal_pair(
    numel: int, keys: Tensor, kind: NoiseKind = "irwin_hall",
    offset: int | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Two independent standard-normal float32 vectors of ``numel`` elements (see module doc).

    ``keys`` needs 3 entries. The result is a pure function of ``(keys, offset, numel, kind)``;
    ``offset`` selects elements ``offset ..`` of the longer vectors (see :func:`random_words`).
    """
    a, b = random_words(numel, keys, streams=2, offset=offset)
    if kind == "irwin_hall":
        return _irwin_hall(a), _irwin_hall(b)
    # Box-Muller on two 24-bit uniforms: u1 in (0, 1] keeps the log finite.
    u1 = (((a >> 8) & 0xFFFFFF) + 1).to(torch.float32) * 2.0**-24
    u2 = ((b >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return radius * torch.cos(angle), radius * torch.sin(angle)
