"""Exact fake quantization to the OCP MX formats and per-tensor scaled FP8.

The module is ``lightning_lowprec.quantizer``; its function ``quantize`` is re-exported as
``lightning_lowprec.quantize`` (a module of that name would be shadowed by the function).

``quantize(x, fmt)`` returns a tensor of ``x``'s shape and dtype whose values lie on the
format's grid, bit-for-bit what the OCP MX v1.0 specification prescribes (the test suite
compares against a per-element transcription of the spec). It runs as a handful of
element-wise passes with no Python loop over blocks, eagerly or under ``torch.compile``; on
CPU in eager mode the passes run over cache-sized slices of the tensor, into one
preallocated output (the one full-size allocation).

Semantics, per scaling group (an MX block of 32 consecutive elements along ``axis``, the last
block shorter when the axis length is not a multiple of 32; or the whole tensor for ``fp8_*``):

* Arithmetic is fp32; bf16/fp16 inputs are widened exactly and the result is cast back with
  round-to-nearest-even (for fp16 a grid value below fp16's subnormal range rounds again).
* MX: ``shared_exp = clamp(floor(log2(amax)) - emax, -127, 127)`` (E8M0's range; the spec's
  rule, ``scale_rule="floor"``) or, with ``scale_rule="rceil"`` (NVIDIA's cuBLAS / Transformer
  Engine rule for MXFP8, torchao's ``ScaleCalculationMode.RCEIL``),
  ``shared_exp = clamp(ceil(log2(f32(amax / max))), -127, 127)``: the smallest power of two
  that maps the fp32 quotient onto the element max, so the block's max saturates (almost)
  never and keeps more of its mantissa (relative MSE on randn in MXFP8 E4M3: 8.6e-4 floor,
  7.1e-4 rceil). Either rule's exponent is then capped at ``top - emax``, ``top`` the
  exponent of the input dtype's largest binade (127 for fp32 and bf16, 15 for fp16): the
  largest scale under which every grid value is finite in that dtype. Only rceil reaches the
  cap, for a block max in the dtype's top binade whose ceiling would be one higher, where the
  block max could round up to ``2**emax * 2**shared_exp = 2**(top + 1)``, inf (fp32 max in
  MXFP8 E4M3: 255.99 rounds to 256 under ``2**120``); such a block takes floor's scale and
  saturates as floor does. Each element ``v = x / 2**shared_exp`` is rounded to the element
  format with quantum
  ``2**(max(floor(log2|v|), emin) - mbits)`` (MXINT8: ``2**-6``), saturated at the element
  max, and scaled back. A block whose max itself rounds up past the element max saturates.
* Per-tensor FP8: ``scale = max / max(amax, max * 2**-126)`` in fp32 (the scale stays a
  finite ``<= 2**126``, so tiny tensors, gradients say, keep their values instead of
  flushing); ``y = x * scale`` is rounded to the element grid as above (saturating) and
  divided by ``scale``.
* Zeros stay zeros and keep their sign; so does anything that rounds to zero.
* NaN **and ±inf** make their whole scaling group NaN, for every format: E8M0 has no infinite
  scale and ``max / inf`` would zero the tensor, so an overflow upstream shows up instead of
  being silently saturated (the ``microxcaling`` library behaves the same). No format or
  scale rule here produces inf from finite inputs.

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

__all__ = ["ROUNDING_MODES", "SCALE_RULES", "quantize", "quantize_ste"]

Rounding = Literal["even", "nearest", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("even", "nearest", "stochastic")
ScaleRule = Literal["floor", "rceil"]
SCALE_RULES: tuple[str, ...] = ("floor", "rceil")
"""How an MX block's shared scale is chosen: ``"floor"`` (the OCP spec) or ``"rceil"``."""


def _tensor_amax_floor(fmt: Format) -> float:
    """The smallest amax a per-tensor scale divides by: ``max * 2**-126``, scale ``2**126``.

    Relative to the format so that any tensor down to fp32's normal range maps its amax to the
    format's max; an absolute floor (once 1e-12) flushed small gradients to zero.
    """
    return fmt.max * 2.0**-126


_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What ``quantize`` accepts: the dtypes it widens to fp32 exactly (float8 would need a cast)."""

_F32_SIGN_MASK = -0x80000000
_F32_EXP_MASK = 0x7F800000
_F32_MANT_MASK = 0x007FFFFF
_F32_MANT_BITS = 23
_F32_BIAS = 127
_F32_MIN_SCALE_BITS = 1 << 22
"""The bits of 2**-127, E8M0's smallest scale (an fp32 subnormal)."""
_TOP_EXPONENTS = {d: math.frexp(torch.finfo(d).max)[1] - 1 for d in _INPUT_DTYPES}
"""``floor(log2(max))`` of each input dtype: 127 (fp32, bf16), 15 (fp16)."""


def quantize(
    x: Tensor,
    fmt: str | Format,
    axis: int = -1,
    rounding: Rounding = "even",
    generator: torch.Generator | None = None,
    scale_rule: ScaleRule = "floor",
) -> Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, values on the format's grid.

    Args:
        x: a floating-point tensor (fp32, bf16 or fp16), any shape and strides.
        fmt: a format name from :data:`lightning_lowprec.formats.FORMATS` or a ``Format``.
        axis: the axis along which MX blocks of 32 run (the matmul's reduction axis).
            Ignored by the per-tensor ``fp8_*`` formats.
        rounding: ``"even"``, ``"nearest"`` or ``"stochastic"`` (see the module docstring).
        generator: source of the uniform draws of stochastic rounding (default: torch's
            global generator for ``x``'s device). Dynamo cannot trace a ``torch.Generator``:
            under ``torch.compile`` the draw with one runs eagerly, breaking the graph (three
            breaks for one call, all at the draw); without one the call is a single graph
            (``fullgraph=True`` works) drawing from Inductor's RNG, which
            ``torch.manual_seed`` makes reproducible.
        scale_rule: an MX block's shared scale, ``"floor"`` (the spec's, default) or
            ``"rceil"`` (see the module docstring). Ignored by the per-tensor formats, whose
            scale is ``max / amax``.

    Raises:
        ValueError: unknown format, rounding mode or scale rule, or ``x`` not fp32, bf16 or
            fp16 (float8 and float64 included).
        IndexError: ``axis`` out of range.
    """
    fmt = parse(fmt)
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Unknown rounding {rounding!r}. Valid modes: {', '.join(ROUNDING_MODES)}."
        )
    if scale_rule not in SCALE_RULES:
        raise ValueError(
            f"Unknown scale_rule {scale_rule!r}. Valid rules: {', '.join(SCALE_RULES)}."
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
    return _quantize_blockwise(x, fmt, axis, rounding, generator, scale_rule, x.dtype)


def _grid_values(x: Tensor, fmt: Format, scale_rule: ScaleRule) -> Tensor:
    """The fp32 grid values of ``quantize(x, fmt, -1, scale_rule=scale_rule)`` (an MX
    ``fmt``), before its cast back to ``x``'s dtype: the exact values the export encodes.

    The scales are those of ``x``'s dtype (capped for fp16's range), so that the cast of the
    result is ``quantize(x, ...)`` bit for bit, where quantizing ``x.float()`` would pick
    fp32's scales.
    """
    return _quantize_blockwise(x.float(), fmt, -1, "even", None, scale_rule, x.dtype)


class _QuantizeSTE(torch.autograd.Function):
    """Forward: fake quantization; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt, axis, rounding, generator, scale_rule):
        return quantize(x, fmt, axis, rounding, generator, scale_rule)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def quantize_ste(
    x: Tensor,
    fmt: str | Format,
    axis: int = -1,
    rounding: Rounding = "even",
    generator: torch.Generator | None = None,
    scale_rule: ScaleRule = "floor",
) -> Tensor:
    """:func:`quantize` whose gradient passes through unchanged (for training).

    Rounding has a zero derivative almost everywhere; the straight-through estimator treats the
    quantizer as the identity in the backward pass, as MX training recipes do.
    """
    fmt = parse(fmt)
    # A built-in format travels by name: under torch.compile(dynamic=True) Dynamo would make a
    # Format's float fields symbolic inputs of the autograd.Function and fail to lift them.
    name_or_fmt = fmt.name if FORMATS.get(fmt.name) == fmt else fmt
    return _QuantizeSTE.apply(x, name_or_fmt, axis, rounding, generator, scale_rule)


_SLICE_ELEMENTS = 1 << 19
"""Elements per slice on the CPU eager path: 2 MiB per fp32 scratch buffer (fastest of 2**16 to
2**20 on a 4096 x 4096 tensor here), so that the passes over a slice run from cache and the
scratch is allocated once per call."""


def _in_slices(x: Tensor) -> bool:
    """Whether ``quantize`` runs slice by slice into one preallocated output (CPU, eager).

    On CPU a fresh full-size buffer costs as much as several arithmetic passes (page faults)
    and each pass over one runs from memory; cache-sized slices with reused scratch avoid
    both, so the output is the one full-size allocation. Under ``torch.compile`` (Inductor
    fuses the passes into one kernel), on accelerators (whose caching allocators make buffers
    cheap) and when autograd records the ops (``out=`` kernels are not differentiable) the
    plain graph runs instead; so it does for tensor subclasses (``DTensor``, fake tensors),
    whose ``out=`` buffers this loop could not make.
    """
    return (
        type(x) in (Tensor, torch.nn.Parameter)
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (x.requires_grad and torch.is_grad_enabled())
    )


class _Scratch:
    """The reused fp32 buffers of the slice loop, one per role, grown on demand."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._slabs: dict[str, Tensor] = {}

    def take(self, role: str, like: Tensor) -> Tensor:
        """A contiguous fp32 tensor of ``like``'s shape backed by the buffer of ``role``."""
        n = like.numel()
        slab = self._slabs.get(role)
        if slab is None or slab.numel() < n:
            slab = self._slabs[role] = torch.empty(n, dtype=torch.float32, device=self._device)
        return slab[:n].view(like.shape)


def _take(scratch: _Scratch | None, role: str, like: Tensor) -> Tensor | None:
    """``scratch``'s buffer for ``role`` as an ``out=`` argument; ``None`` (allocate) without."""
    return None if scratch is None else scratch.take(role, like)


def _quantize_blockwise(
    x: Tensor,
    fmt: Format,
    axis: int,
    rounding: str,
    generator: torch.Generator | None,
    scale_rule: str,
    dtype: torch.dtype,
) -> Tensor:
    """``x`` quantized to the MX ``fmt`` along ``axis``, with the scales of ``dtype`` (the
    input's; see :func:`_biased_shared_exponents`)."""
    # View x as (before, axis, after) and cut the axis into blocks in place: (before, blocks,
    # 32, after), reduced over dim 2. No axis is moved, so a contiguous x is never copied
    # (whatever the axis) and the output keeps x's layout.
    axis = axis % x.ndim if x.ndim else 0
    length = x.shape[axis] if x.ndim else 1
    after = math.prod(x.shape[axis + 1 :])
    # The last axis keeps a 2-D view: a trailing dimension of size 1 slows the kernels down.
    grouped = x.reshape(-1, length, after) if after > 1 else x.reshape(-1, length)
    if _in_slices(x):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dst = out.view(grouped.shape)
        # The whole blocks, then the short last block as a view of its own: no padded copy of
        # x, and no copy to cut the padding off the result.
        full = length - length % fmt.block_size
        for start, stop in ((0, full), (full, length)):
            if stop > start:
                size = min(fmt.block_size, stop - start)
                _quantize_blocks_in_slices(
                    grouped[:, start:stop].unflatten(1, (-1, size)),
                    dst[:, start:stop].unflatten(1, (-1, size)),
                    fmt, rounding, generator, scale_rule, dtype,
                )
        return out
    # The whole blocks and the short last block quantized apart and concatenated: Inductor
    # writes both straight into the output, where padding x cost a copy in and a slice out.
    full = length - length % fmt.block_size
    # A loop, not a comprehension: a graph break inside a comprehension's frame (the draw with
    # an explicit generator) would break the graph once more.
    pieces = []
    for start, stop in ((0, full), (full, length)):
        if stop > start:
            size = min(fmt.block_size, stop - start)
            blocks = grouped[:, start:stop].unflatten(1, (-1, size))
            pieces.append(
                _quantize_block_view(blocks, fmt, rounding, generator, scale_rule, dtype)
                .flatten(1, 2)
            )
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return out.reshape(x.shape)


def _quantize_block_view(
    blocks: Tensor,
    fmt: Format,
    rounding: str,
    generator: torch.Generator | None,
    scale_rule: str,
    dtype: torch.dtype,
) -> Tensor:
    """The plain graph on blocks ``(rows, blocks, size[, after])``, reduced over dim 2: a
    fresh tensor of ``blocks``' shape and dtype, with the scales of ``dtype``."""
    # Under compile |x| fuses into the reduction (one reduction, not two; in fp32, exact:
    # Inductor fails to compile several fp16 abs-max reductions in one kernel); eagerly
    # max(amax, -amin) is one cheap pass each, where abs() would allocate a copy. Both
    # propagate NaN.
    if torch.compiler.is_compiling():
        amax = blocks.float().abs().amax(2, keepdim=True)
    else:
        amax = torch.maximum(blocks.amax(2, keepdim=True), -blocks.amin(2, keepdim=True))
    inverse, scale, finite = _block_scales(amax.float(), fmt, scale_rule, dtype)
    values = blocks * inverse  # the one fp32 buffer; everything after is in place
    _round_elements_(values, fmt, rounding, generator)
    # NaN blocks are filled after the cast so that they hold the output dtype's default NaN:
    # CPU's vectorised fp32 -> bf16 cast writes NaN as 0xFFFF, the scalar one as 0x7FC0.
    return values.mul_(scale).to(blocks.dtype).masked_fill_(~finite, torch.nan)


def _block_scales(
    amax: Tensor, fmt: Format, scale_rule: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``(2**-shared_exp, 2**shared_exp, amax is finite)`` from the fp32 block maxima of a
    ``dtype`` tensor.

    Built from the bits, in a few small integer ops: ``floor(log2(amax))`` is the exponent
    field (0 / subnormal amax land at or below E8M0's lower limit, which clamps them), and
    ``2**n`` for ``n`` in [-127, 127] is a shifted exponent field, but for ``2**-127``, the
    one E8M0 scale below fp32's normal range (``exp2`` is not guaranteed exact, and
    ``.to(float8_e8m0fnu)`` rounds instead of flooring).
    """
    biased = _biased_shared_exponents(amax, fmt, scale_rule, dtype)
    # A biased exponent of 0 gives the bits 0 (the value 0.0), which the clamp lifts to 2**-127.
    scale = (biased << _F32_MANT_BITS).clamp_(min=_F32_MIN_SCALE_BITS).view(torch.float32)
    inverse = ((2 * _F32_BIAS - biased) << _F32_MANT_BITS).clamp_(min=_F32_MIN_SCALE_BITS)
    return inverse.view(torch.float32), scale, torch.isfinite(amax)


def _biased_shared_exponents(
    amax: Tensor, fmt: Format, scale_rule: str, dtype: torch.dtype
) -> Tensor:
    """``shared_exp + 127`` (int32, E8M0's biased code in [0, 254]) of the fp32 block maxima
    of a ``dtype`` tensor (fp32, bf16 or fp16: the dtype the quantized values are cast to).

    The one place the scale rule is decided, so that the quantizer, the ``scaled_mm`` backend,
    the export and the monitor agree on every block's scale. A NaN/inf ``amax`` gives some
    code; its block is NaN anyway.
    """
    if scale_rule == "floor":
        # shared_exp + 127 = floor(log2(amax)) - emax + 127.
        biased = (amax.view(torch.int32) >> _F32_MANT_BITS) - fmt.emax
    else:
        # shared_exp + 127 = ceil(log2(d)) + 127 for d = f32(amax / max) (a true division):
        # the exponent field, plus one unless the mantissa is zero. That is one too many for
        # a subnormal d <= 2**-127, whose ceiling is already at or below E8M0's limit.
        d = (amax / fmt.max).view(torch.int32)
        biased = (d >> _F32_MANT_BITS) + (d & _F32_MANT_MASK).ne(0)
        biased = torch.where(d > _F32_MIN_SCALE_BITS, biased, 0)
    # Clamped to E8M0's range, shared_exp >= -127, and to top - emax (<= 127): every grid
    # value times the scale is then at most max * 2**(top - emax) < 2**top * (2 - 2**-7),
    # finite in dtype (fp16, bf16 round to inf only from (2 - 2**-11), (2 - 2**-8) * 2**top).
    # Floor's exponent, floor(log2(amax)) - emax, never exceeds the cap; rceil's exceeds it
    # for some maxima in dtype's top binade, whose max could round up to 2**(top + 1) = inf.
    top = min(_TOP_EXPONENTS[dtype] - fmt.emax, E8M0_MAX_EXP)
    return biased.clamp_(E8M0_MIN_EXP + _F32_BIAS, top + _F32_BIAS)


def _quantize_blocks_in_slices(
    src: Tensor,
    dst: Tensor,
    fmt: Format,
    rounding: str,
    generator: torch.Generator | None,
    scale_rule: str,
    dtype: torch.dtype,
) -> None:
    """Quantize the blocks ``src`` (``(rows, blocks, size[, after])``) into the output view
    ``dst``, slice by slice: the input is read from memory once and the output written once,
    every pass in between runs on a cache-sized fp32 slice (the output itself for fp32). The
    scales are those of ``dtype``."""
    scratch = _Scratch(src.device)
    for index in _slices(src.shape):
        piece, out = src[index], dst[index]
        values = out if out.dtype == torch.float32 else scratch.take("values", out)
        if piece.dtype != torch.float32:
            piece = values.copy_(piece)  # widened once (exact); the cast passes are slow
        # |x| as the bits with the sign masked off, reduced as integers: their order is the
        # magnitudes' (NaN's bits above inf's), and an integer max is half a float max's time.
        magnitude = torch.bitwise_and(piece.view(torch.int32), ~_F32_SIGN_MASK,
                                      out=scratch.take("quantum", piece).view(torch.int32))
        inverse, scale, finite = _block_scales(
            magnitude.amax(2, keepdim=True).view(torch.float32), fmt, scale_rule, dtype)
        torch.mul(piece, inverse, out=values)
        _round_elements_(values, fmt, rounding, generator, scratch)
        values.mul_(scale)
        if values is not out:
            out.copy_(values)
        if not bool(finite.all()):
            out.masked_fill_(~finite, torch.nan)


def _slices(shape: torch.Size) -> list[tuple[slice, ...]]:
    """Index tuples that cut a ``(rows, blocks, size[, after])`` view into pieces of about
    ``_SLICE_ELEMENTS`` elements (whole rows, else blocks of one row, else columns of one
    block), never splitting a block (dim 2)."""
    rows, blocks, size = shape[:3]
    after = shape[3] if len(shape) == 4 else 1
    row, block = blocks * size * after, size * after
    if row <= _SLICE_ELEMENTS:
        step = _SLICE_ELEMENTS // row
        return [(slice(r, r + step),) for r in range(0, rows, step)]
    if block <= _SLICE_ELEMENTS or len(shape) == 3:
        step = max(1, _SLICE_ELEMENTS // block)
        return [(slice(r, r + 1), slice(b, b + step))
                for r in range(rows) for b in range(0, blocks, step)]
    step = max(1, _SLICE_ELEMENTS // size)
    return [(slice(r, r + 1), slice(b, b + 1), slice(None), slice(a, a + step))
            for r in range(rows) for b in range(blocks) for a in range(0, after, step)]


def _quantize_tensorwise(
    x: Tensor, fmt: Format, rounding: str, generator: torch.Generator | None
) -> Tensor:
    amax = torch.maximum(x.amax(), -x.amin()).float()
    # A true division: `float / tensor` would multiply by the reciprocal and round twice.
    scale = torch.full_like(amax, fmt.max) / amax.clamp(min=_tensor_amax_floor(fmt))
    if _in_slices(x):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if not bool(torch.isfinite(amax)):
            return out.fill_(torch.nan)
        src, dst = x.reshape(-1), out.view(-1)
        scratch = _Scratch(x.device)
        for start in range(0, src.numel(), _SLICE_ELEMENTS):
            piece = dst[start : start + _SLICE_ELEMENTS]
            values = piece if piece.dtype == torch.float32 else scratch.take("values", piece)
            # scale as one element, not 0-d, so that `bf16 * scale` computes in fp32.
            torch.mul(src[start : start + _SLICE_ELEMENTS], scale.view(1), out=values)
            _round_elements_(values, fmt, rounding, generator, scratch)
            values.div_(scale)
            if values is not piece:
                piece.copy_(values)
        return out
    values = x.to(torch.float32, copy=True).mul_(scale)  # the one fresh fp32 buffer
    _round_elements_(values, fmt, rounding, generator)
    return values.div_(scale).to(x.dtype).masked_fill_(~torch.isfinite(amax), torch.nan)


def _round_elements_(
    v: Tensor,
    fmt: Format,
    rounding: str,
    generator: torch.Generator | None,
    scratch: _Scratch | None = None,
) -> None:
    """Round fp32 ``v`` (already divided by its scale) onto ``fmt``'s element grid in place.

    Saturates at the element max. Each product and quotient is by a power of two, hence exact;
    only the rounding step rounds. The temporaries live in ``scratch`` where given (the CPU
    slice loop), else they are fresh tensors (a graph that Inductor fuses away).
    """
    if rounding == "even" and scratch is None:
        v.copy_(_round_even(v, fmt)).clamp_(-fmt.max, fmt.max)
        return
    quantum: Tensor | float
    if fmt.element == "int":
        quantum = 2.0**-fmt.mbits
    else:
        # Quantum 2**(floor(log2 max(|v|, 2**emin)) - mbits): the element's own exponent, or
        # emin's for subnormal elements, read off the exponent bits.
        quantum = torch.abs(v, out=_take(scratch, "quantum", v)).clamp_(min=2.0**fmt.emin)
        quantum.view(torch.int32).bitwise_and_(_F32_EXP_MASK)
        quantum.mul_(2.0**-fmt.mbits)
    if rounding == "even":
        # Ties-to-even is symmetric in sign, and round(-0.3) is -0.0: v keeps its sign. A
        # fixed quantum (MXINT8) is a product by its inverse, a power of two: exact, and a
        # scalar division costs twice a product here.
        v.div_(quantum) if isinstance(quantum, Tensor) else v.mul_(1 / quantum)
        v.round_()
    else:
        # The quantum carries v's sign, so v / quantum is a magnitude for the floor-based modes
        # below; multiplying back restores the sign, also of values that round to zero.
        if isinstance(quantum, float):
            quantum = torch.full(v.shape, quantum, dtype=torch.float32, device=v.device,
                                 out=_take(scratch, "quantum", v))
        v.div_(quantum.copysign_(v))
    if rounding == "nearest":
        # Not floor(v + 0.5): the sum rounds in fp32 and lifts 0.5 - 2**-25 to 1.
        round_up = torch.frac(v, out=_take(scratch, "frac", v)).ge_(0.5)
        v.floor_().add_(round_up)
    elif rounding == "stochastic":
        # fp32 draws whatever the default dtype: bf16 draws (the plugin's param_dtype="bf16"
        # sets that default) have 8 bits, biasing every probability below 2**-8.
        draws = torch.rand(v.shape, generator=generator, dtype=torch.float32, device=v.device,
                           out=_take(scratch, "draws", v))
        round_up = draws.lt_(torch.frac(v, out=_take(scratch, "frac", v)))
        v.floor_().add_(round_up)
    v.mul_(quantum).clamp_(-fmt.max, fmt.max)


def _round_even(v: Tensor, fmt: Format) -> Tensor:
    """``v`` rounded to ``fmt``'s element grid (ties to even), before saturation, as one
    expression for Inductor to fuse: no division and no bit casts (Inductor's CPU code moves
    a vector through memory for each ``view(torch.int32)``).

    Normal elements keep ``mbits + 1`` significant bits by Veltkamp's split ``c - (c - v)``
    with ``c = v * (2**(23 - mbits) + 1)``, which is round-to-nearest-even on the fp32 grid
    (checked over every fp32 mantissa of a binade, both signs); elements below ``2**emin``
    (and every MXINT8 element) have the fixed quantum ``2**(emin - mbits)``, a power-of-two
    product away from ``round``. Both keep the sign of zero; ``|v| < 2**(emax + 1)``, so
    ``c`` never overflows.
    """
    low = fmt.min_subnormal
    fixed = torch.round(v * (1 / low)) * low
    if fmt.element == "int":
        return fixed
    split = v * float(2 ** (_F32_MANT_BITS - fmt.mbits) + 1)
    return torch.where(v.abs() < fmt.min_normal, fixed, split - (split - v))


def _exp2(n: Tensor) -> Tensor:
    """Exact ``2.0**n`` in fp32 for int32 ``n`` in [-127, 127], built from the bits.

    ``exp2`` is not guaranteed exact and ``.to(float8_e8m0fnu)`` rounds instead of flooring;
    ``2**-127`` is the one E8M0 scale below fp32's normal range.
    """
    bits = torch.where(n > -_F32_BIAS, (n + _F32_BIAS) << _F32_MANT_BITS, _F32_MIN_SCALE_BITS)
    return bits.view(torch.float32)
