"""Exact fake quantization to the OCP MX formats and per-tensor scaled FP8.

``quantize(x, fmt)`` returns a tensor of ``x``'s shape and dtype whose values lie on the
format's grid, bit-for-bit what the OCP MX v1.0 specification prescribes (the test suite
compares against a per-element transcription of the spec). It runs as a handful of
element-wise passes with no Python loop over blocks, eagerly or under ``torch.compile``.

Semantics, per scaling group (an MX block of 32 consecutive elements along ``axis``, the last
block shorter when the axis length is not a multiple of 32; or the whole tensor for ``fp8_*``):

* Arithmetic is fp32; bf16/fp16 inputs are widened exactly and the result is cast back with
  round-to-nearest-even (for fp16 a grid value below fp16's subnormal range rounds again).
* MX: ``shared_exp = clamp(floor(log2(amax)) - emax, -127, 127)`` (E8M0's range); each element
  ``v = x / 2**shared_exp`` is rounded to the element format with quantum
  ``2**(max(floor(log2|v|), emin) - mbits)`` (MXINT8: ``2**-6``), saturated at the element
  max, and scaled back. A block whose max itself rounds up past the element max saturates.
* Per-tensor FP8: ``scale = max / max(amax, max * 2**-126)`` in fp32 (the scale stays a
  finite ``<= 2**126``, so tiny tensors, gradients say, keep their values instead of
  flushing); ``y = x * scale`` is rounded to the element grid as above (saturating) and
  divided by ``scale``.
* Zeros stay zeros and keep their sign; so does anything that rounds to zero.
* NaN **and ±inf** make their whole scaling group NaN, for every format: E8M0 has no infinite
  scale and ``max / inf`` would zero the tensor, so an overflow upstream shows up instead of
  being silently saturated (the ``microxcaling`` library behaves the same). No format here
  ever produces inf.

Rounding modes: ``"even"`` (round to nearest, ties to even: the spec's default),
``"nearest"`` (ties away from zero, ``microxcaling``'s default), ``"stochastic"`` (round up
with probability equal to the distance from the lower grid point: unbiased before saturation;
draws come from ``generator``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_lowprec.formats import E8M0_MAX_EXP, E8M0_MIN_EXP, FORMATS, Format, parse

__all__ = ["ROUNDING_MODES", "quantize", "quantize_ste"]

Rounding = Literal["even", "nearest", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("even", "nearest", "stochastic")



def _tensor_amax_floor(fmt: Format) -> float:
    """The smallest amax a per-tensor scale divides by: ``max * 2**-126``, scale ``2**126``.

    Relative to the format so that any tensor down to fp32's normal range maps its amax to the
    format's max; an absolute floor (once 1e-12) flushed small gradients to zero.
    """
    return fmt.max * 2.0**-126

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What ``quantize`` accepts: the dtypes it widens to fp32 exactly (float8 would need a cast)."""

_F32_EXP_MASK = 0x7F800000
_F32_MANT_BITS = 23
_F32_BIAS = 127


def quantize(
    x: Tensor,
    fmt: str | Format,
    axis: int = -1,
    rounding: Rounding = "even",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, values on the format's grid.

    Args:
        x: a floating-point tensor (fp32, bf16 or fp16), any shape and strides.
        fmt: a format name from :data:`lightning_lowprec.formats.FORMATS` or a ``Format``.
        axis: the axis along which MX blocks of 32 run (the matmul's reduction axis).
            Ignored by the per-tensor ``fp8_*`` formats.
        rounding: ``"even"``, ``"nearest"`` or ``"stochastic"`` (see the module docstring).
        generator: source of the uniform draws of stochastic rounding (default: torch's
            global generator for ``x``'s device).

    Raises:
        ValueError: unknown format or rounding mode, or ``x`` not fp32, bf16 or fp16 (float8
            and float64 included).
        IndexError: ``axis`` out of range.
    """
    fmt = parse(fmt)
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Unknown rounding {rounding!r}. Valid modes: {', '.join(ROUNDING_MODES)}."
        )
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"quantize expects a fp32, bf16 or fp16 tensor, got {x.dtype}. "
            f"Valid dtypes: {', '.join(map(str, _INPUT_DTYPES))}."
        )
    if not -max(x.ndim, 1) <= axis < max(x.ndim, 1):
        raise IndexError(f"axis {axis} is out of range for a {x.ndim}-D tensor.")
    if x.numel() == 0:
        return x.clone()
    if fmt.scaling == "tensor":
        return _quantize_tensorwise(x, fmt, rounding, generator)
    return _quantize_blockwise(x, fmt, axis, rounding, generator)


class _QuantizeSTE(torch.autograd.Function):
    """Forward: fake quantization; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt, axis, rounding, generator):
        return quantize(x, fmt, axis, rounding, generator)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def quantize_ste(
    x: Tensor,
    fmt: str | Format,
    axis: int = -1,
    rounding: Rounding = "even",
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`quantize` whose gradient passes through unchanged (for training).

    Rounding has a zero derivative almost everywhere; the straight-through estimator treats the
    quantizer as the identity in the backward pass, as MX training recipes do.
    """
    fmt = parse(fmt)
    # A built-in format travels by name: under torch.compile(dynamic=True) Dynamo would make a
    # Format's float fields symbolic inputs of the autograd.Function and fail to lift them.
    name_or_fmt = fmt.name if FORMATS.get(fmt.name) == fmt else fmt
    return _QuantizeSTE.apply(x, name_or_fmt, axis, rounding, generator)


def _quantize_blockwise(
    x: Tensor, fmt: Format, axis: int, rounding: str, generator: torch.Generator | None
) -> Tensor:
    # View x as (before, axis, after) and cut the axis into blocks in place: (before, blocks,
    # 32, after), reduced over dim 2. No axis is moved, so a contiguous x is never copied
    # (whatever the axis) and the output keeps x's layout.
    axis = axis % x.ndim if x.ndim else 0
    length = x.shape[axis] if x.ndim else 1
    after = math.prod(x.shape[axis + 1 :])
    # The last axis keeps a 2-D view: a trailing dimension of size 1 slows the kernels down.
    grouped = x.reshape(-1, length, after) if after > 1 else x.reshape(-1, length)
    pad = -length % fmt.block_size
    if pad:
        grouped = torch.nn.functional.pad(grouped, (0, 0, 0, pad) if after > 1 else (0, pad))
    blocks = grouped.unflatten(1, (-1, fmt.block_size))

    # max(amax, -amin) is one cheap pass each and propagates NaN; abs() would allocate a copy.
    amax = torch.maximum(blocks.amax(2, keepdim=True), -blocks.amin(2, keepdim=True)).float()
    # floor(log2(amax)) straight from the exponent bits: exact, and 0 / subnormal amax land at
    # -127 or below, which E8M0's lower limit clamps anyway.
    amax_exp = (amax.view(torch.int32) >> _F32_MANT_BITS) - _F32_BIAS
    shared_exp = (amax_exp - fmt.emax).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    values = blocks * _exp2(-shared_exp)  # the one fp32 buffer; everything after is in place
    _round_elements_(values, fmt, rounding, generator)
    values.mul_(_exp2(shared_exp)).masked_fill_(~torch.isfinite(amax), torch.nan)

    # Cast before cutting the padding off: Inductor (torch 2.13) miscompiles the slice followed
    # by a narrowing cast, leaving uninitialised memory in the short last block (issue 18).
    out = values.flatten(1, 2).to(x.dtype)
    if pad:
        out = out[:, :length]
    return out.reshape(x.shape)


def _quantize_tensorwise(
    x: Tensor, fmt: Format, rounding: str, generator: torch.Generator | None
) -> Tensor:
    amax = torch.maximum(x.amax(), -x.amin()).float()
    # A true division: `float / tensor` would multiply by the reciprocal and round twice.
    scale = torch.full_like(amax, fmt.max) / amax.clamp(min=_tensor_amax_floor(fmt))
    values = x.to(torch.float32, copy=True).mul_(scale)  # the one fresh fp32 buffer
    _round_elements_(values, fmt, rounding, generator)
    values.div_(scale).masked_fill_(~torch.isfinite(amax), torch.nan)
    return values.to(x.dtype)


def _round_elements_(
    v: Tensor, fmt: Format, rounding: str, generator: torch.Generator | None
) -> None:
    """Round fp32 ``v`` (already divided by its scale) onto ``fmt``'s element grid in place.

    Saturates at the element max. Each product and quotient is by a power of two, hence exact;
    only the rounding step rounds. In place because on CPU a fresh large tensor costs as much
    as several arithmetic passes (page faults), so eager mode allocates one extra buffer.
    """
    if fmt.element == "int":
        quantum = torch.full_like(v, 2.0**-fmt.mbits)
    else:
        # Quantum 2**(floor(log2 max(|v|, 2**emin)) - mbits): the element's own exponent, or
        # emin's for subnormal elements, read off the exponent bits.
        quantum = v.abs().clamp_(min=2.0**fmt.emin)
        quantum.view(torch.int32).bitwise_and_(_F32_EXP_MASK)
        quantum.mul_(2.0**-fmt.mbits)
    # The quantum carries v's sign, so v / quantum is a magnitude and rounding is symmetric in
    # sign; multiplying back restores the sign, also of values that round to zero.
    quantum.copysign_(v)
    v.div_(quantum)
    if rounding == "even":
        v.round_()
    elif rounding == "nearest":
        # Not floor(v + 0.5): the sum rounds in fp32 and lifts 0.5 - 2**-25 to 1.
        round_up = v.frac().ge_(0.5)
        v.floor_().add_(round_up)
    else:
        # fp32 draws whatever the default dtype: bf16 draws (the plugin's param_dtype="bf16"
        # sets that default) have 8 bits, biasing every probability below 2**-8.
        draws = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
        round_up = draws.lt_(v.frac())
        v.floor_().add_(round_up)
    v.mul_(quantum).clamp_(-fmt.max, fmt.max)


def _exp2(n: Tensor) -> Tensor:
    """Exact ``2.0**n`` in fp32 for int32 ``n`` in [-127, 127], built from the bits.

    ``exp2`` is not guaranteed exact and ``.to(float8_e8m0fnu)`` rounds instead of flooring;
    ``2**-127`` is the one E8M0 scale below fp32's normal range.
    """
    bits = torch.where(n > -_F32_BIAS, (n + _F32_BIAS) << _F32_MANT_BITS, 1 << 22)
    return bits.view(torch.float32)
