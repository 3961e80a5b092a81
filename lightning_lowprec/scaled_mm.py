"""Real FP8 matmuls: the ``scaled_mm`` backend of :class:`~lightning_lowprec.QuantizedLinear`.

The emulated backend multiplies fake-quantized operands in the working dtype: exact on any
hardware, but slower than a plain matmul. Where the hardware has FP8 tensor cores, this module
quantizes the operands to real ``float8`` tensors plus scales and multiplies them there:

* per-tensor ``fp8_e4m3`` / ``fp8_e5m2``: ``torch._scaled_mm`` with one fp32 scale per operand
  (CUDA compute capability 8.9+: Ada, Hopper, Blackwell; it also runs on CPU, slowly, which is
  what the tests check it on);
* block-scaled ``mxfp8_e4m3`` / ``mxfp8_e5m2``: ``torch.nn.functional.scaled_mm`` with one E8M0
  scale per 32 elements along the reduction axis (``BlockWise1x32``, scales in cuBLAS's swizzled
  layout), CUDA compute capability 10.x (Blackwell) only.

The operands are the ones :func:`~lightning_lowprec.quantize` produces: the same scales, grid,
saturation and NaN rule (round-to-nearest-even is a clamp and a native ``float8`` cast, which
the tests check equals ``quantize``; the other rounding modes go through ``quantize`` itself).
So the output equals the emulated backend's up to rounding in fp32 and in the working dtype:
with ``u = 2**-24``, ``u_w`` the working dtype's unit roundoff (fp32 ``2**-24``, bf16 ``2**-8``,
fp16 ``2**-11``) and ``K`` the reduction length, every output element satisfies::

    |y_scaled_mm - y_emulated| <= (4 * u_w + (2 * K + 8) * u) * sum_k |Q(a)_k * Q(b)_k|

(first order; both sides multiply the same quantized values, the emulation rounds them once
more into fp32 and the working dtype, and the accumulation order differs).

Operands whose reduction or output length is not a multiple of the kernels' alignment (16;
32 for MX) are padded with zeros along it: zeros change neither a scale nor a sum, and MX's
last short block is exactly the zero-padded block of the emulation. (On ``meta`` tensors torch
checks these layouts as on CUDA; the tests use that to check the MX calls without a GPU.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lowprec.formats import Format
from lightning_lowprec.quantizer import (
    Rounding,
    ScaleRule,
    _biased_shared_exponents,
    _tensor_amax_floor,
    quantize,
)

__all__ = ["BACKENDS", "Backend"]

Backend = Literal["auto", "emulated", "scaled_mm"]
BACKENDS: tuple[str, ...] = ("auto", "emulated", "scaled_mm")

SCALED_MM_FORMATS: tuple[str, ...] = ("fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp8_e5m2")
"""The formats with a native float8 element; only they can run on FP8 tensor cores."""

TENSORWISE_CAPABILITY = (8, 9)
"""Oldest CUDA compute capability with FP8 tensor cores (Ada; Hopper is 9.0)."""
MX_CAPABILITY = (10, 0)
"""CUDA compute capabilities with block-scaled MXFP8 matmuls (Blackwell data center, 10.x)."""

_ALIGN = {"tensor": 16, "block": 32}
"""Multiple of which the reduction and output lengths must be (cuBLASLt; MX blocks of 32)."""
_SCALE_ROWS, _SCALE_COLS = 128, 4
"""The tile of cuBLAS's swizzled block-scale layout (``SwizzleType.SWIZZLE_32_4_4``)."""


def check_backend(
    backend: str, w_fmt: Format | None, a_fmt: Format | None, g_fmt: Format | None
) -> Backend:
    """Validate ``backend`` against the formats (``None``: nothing is quantized); return it.

    Raises:
        ValueError: an unknown backend, or ``"scaled_mm"`` with a format that has no float8
            element or with two operands of one matmul scaled differently (per-tensor x MX).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Valid backends: {', '.join(BACKENDS)}.")
    if backend == "scaled_mm" and w_fmt is not None and a_fmt is not None:
        reason = _format_problem(w_fmt, a_fmt, g_fmt)
        if reason is not None:
            raise ValueError(
                f"backend='scaled_mm' {reason}. Formats it runs: {', '.join(SCALED_MM_FORMATS)} "
                "(one scaling per matmul); use backend='emulated' or 'auto' for the others."
            )
    return backend


def use_scaled_mm(
    backend: Backend, device: torch.device, w_fmt: Format, a_fmt: Format, g_fmt: Format | None
) -> bool:
    """Whether a forward on ``device`` runs on ``scaled_mm`` (``"auto"``: only on a CUDA device
    that has the kernels for these formats; CPU stays emulated unless asked).

    Raises:
        ValueError: ``backend="scaled_mm"`` on a device that has no kernel for these formats.
    """
    if backend == "emulated":
        return False
    if backend == "auto" and (device.type != "cuda" or _format_problem(w_fmt, a_fmt, g_fmt)):
        return False
    reason = _device_problem(device, w_fmt, a_fmt, g_fmt)
    if reason is None:
        return True
    if backend == "auto":
        return False
    raise ValueError(
        f"backend='scaled_mm' cannot run {_format_names(w_fmt, a_fmt, g_fmt)} on {device}: "
        f"{reason}. Valid backends here: 'emulated', 'auto' (per-tensor fp8_e4m3/fp8_e5m2 on "
        "CUDA 8.9+ or CPU, MXFP8 on CUDA 10.x)."
    )


def scaled_mm_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w_fmt: Format,
    a_fmt: Format,
    g_fmt: Format | None,
    rounding: Rounding,
    grad_rounding: Rounding | None = None,
    scale_rule: ScaleRule = "floor",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.linear`` on float8 operands: ``Q_a(x) @ Q_w(W).T + b`` in ``dtype`` (``None``:
    ``x``'s).

    Backward with ``g_fmt=None`` (straight-through): ``dx = g @ Q_w(W)``, ``dW = g.T @ Q_a(x)``
    in the working dtype, from the float8 operands kept by the forward (one byte per element).
    With ``g_fmt`` both backward matmuls run on float8 too (``Q_g(g)``; ``fp8_e5m2`` is the
    usual gradient format), each quantized along its own reduction axis as in the emulation.
    The bias is added in the working dtype. ``grad_rounding`` rounds ``g`` (``None``:
    ``rounding``); ``scale_rule`` chooses the MX block scales, as for
    :func:`~lightning_lowprec.quantize`.

    ``dtype`` is the working dtype (autocast's): the matmuls write it and the backward's
    straight-through matmuls run in it, as the emulated backend's do; ``bias`` must be in it.
    Every operand is quantized from its own dtype (the fp32 weight, say), never from a copy
    cast to ``dtype``: that would round twice (a bf16 amax moves the scale, a bf16 element
    can round to another code), and the float8 operands would differ from the emulated
    backend's. The gradients come back in ``x``'s and ``weight``'s dtypes.
    """
    grad_rounding = rounding if grad_rounding is None else grad_rounding
    dtype = x.dtype if dtype is None else dtype
    y = _ScaledMMLinear.apply(x, weight, w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule,
                              dtype)
    return y if bias is None else y + bias


class _ScaledMMLinear(torch.autograd.Function):
    """``Q_a(x) @ Q_w(W).T`` on float8 kernels, with the backward of :func:`scaled_mm_linear`."""

    @staticmethod
    def forward(ctx, x, weight, w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule, dtype):
        tokens = x.reshape(-1, x.shape[-1])
        a = quantize_operand(tokens, a_fmt, rounding, scale_rule)
        b = quantize_operand(weight, w_fmt, rounding, scale_rule)
        ctx.settings = (w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule, x.shape,
                        dtype, x.dtype, weight.dtype)
        if g_fmt is None:
            ctx.save_for_backward(*a, *b)
        else:
            ctx.save_for_backward(tokens, weight)
        return _matmul(a, b, a_fmt, weight.shape[0], dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        w_fmt, a_fmt, g_fmt, rounding, grad_rounding, rule, shape, dtype, x_dtype, w_dtype = (
            ctx.settings)
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if g_fmt is None:
            a_el, a_sc, b_el, b_sc = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                w_q = _dequantize(b_el, b_sc, w_fmt, shape[-1], dtype)
                grad_x = (grad.to(dtype) @ w_q).reshape(shape).to(x_dtype)
            if ctx.needs_input_grad[1]:
                a_q = _dequantize(a_el, a_sc, a_fmt, shape[-1], dtype)
                grad_w = (grad.T.to(dtype) @ a_q).to(w_dtype)
            return grad_x, grad_w, None, None, None, None, None, None, None
        tokens, weight = ctx.saved_tensors
        g = quantize_operand(grad, g_fmt, grad_rounding, rule)
        if ctx.needs_input_grad[0]:
            # dx = g @ W sums over out_features: W.T's rows are blocked along it.
            w_t = quantize_operand(weight.T.contiguous(), w_fmt, rounding, rule)
            grad_x = _matmul(g, w_t, g_fmt, weight.shape[1], dtype).reshape(shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # dW = g.T @ x sums over the tokens: both transposed, blocked along the tokens.
            g_t = quantize_operand(grad.T.contiguous(), g_fmt, grad_rounding, rule)
            x_t = quantize_operand(tokens.T.contiguous(), a_fmt, rounding, rule)
            grad_w = _matmul(g_t, x_t, g_fmt, tokens.shape[1], dtype).to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None


def quantize_operand(
    t: Tensor, fmt: Format, rounding: Rounding, scale_rule: ScaleRule = "floor"
) -> tuple[Tensor, Tensor]:
    """A 2-D ``t`` (rows, K) as float8 elements and the scales that decode them.

    Returns ``(elements, scales)``: ``elements`` (rows, K padded to the alignment) in
    ``fmt.torch_dtype``; ``scales`` the fp32 decode scale ``amax / max`` (per-tensor) or the
    E8M0 scale of each block, (rows, K / 32) as ``float8_e8m0fnu`` (MX). ``elements * scales``
    is :func:`~lightning_lowprec.quantize` of ``t`` (along K), up to one fp32 rounding for
    per-tensor formats and exactly for MX, with the same ``scale_rule`` (and ``t.dtype``'s
    scales: fp16's range caps them).
    """
    pad = -t.shape[1] % _ALIGN[fmt.scaling]
    if pad:
        t = F.pad(t, (0, pad))
    if fmt.scaling == "tensor":
        amax = torch.maximum(t.amax(), -t.amin()).float().clamp(min=_tensor_amax_floor(fmt))
        encode = torch.full_like(amax, fmt.max) / amax  # quantize's scale, to the bit
        decode = amax / fmt.max
    else:
        blocks = t.unflatten(1, (-1, fmt.block_size))
        amax = torch.maximum(blocks.amax(2, keepdim=True), -blocks.amin(2, keepdim=True)).float()
        biased = _biased_shared_exponents(amax, fmt, scale_rule, t.dtype)
        decode = biased.to(torch.uint8).view(torch.float8_e8m0fnu)
        encode = 1 / decode.float()  # a power of two: exact
        t = blocks
    if rounding == "even":
        # Round-to-nearest-even with saturation is the native cast of the clamped value.
        values = t.float().mul(encode).clamp_(-fmt.max, fmt.max)
        values.masked_fill_(~torch.isfinite(amax), torch.nan)
    else:
        # quantize's grid values times the scale: recovered exactly by the nearest float8.
        values = quantize(t, fmt, -1, rounding, scale_rule=scale_rule).float().mul_(encode)
    elements = values.to(fmt.torch_dtype).reshape(t.shape[0], -1)
    return elements, decode.float() if fmt.scaling == "tensor" else decode.squeeze(2)


def _dequantize(
    elements: Tensor, scales: Tensor, fmt: Format, k: int, dtype: torch.dtype
) -> Tensor:
    """``Q(t)`` in ``dtype`` from :func:`quantize_operand`'s output, cut back to ``k`` columns."""
    values = elements.float()
    if fmt.scaling == "tensor":
        values = values * scales
    else:
        values = (values.unflatten(1, (-1, fmt.block_size)) * scales.float()[..., None]).flatten(1)
    return values[:, :k].to(dtype)


def _matmul(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], fmt: Format, n: int, dtype: torch.dtype
) -> Tensor:
    """``Q(a) @ Q(b).T`` (both quantized along K) on float8 kernels; (rows of a, n) in ``dtype``.

    ``b``'s rows are padded to the alignment too (the kernels want N aligned as well); the
    padded output columns are cut off.
    """
    (a_el, a_sc), (b_el, b_sc) = a, b
    pad = -b_el.shape[0] % _ALIGN[fmt.scaling]
    if pad:
        b_el = F.pad(b_el.view(torch.uint8), (0, 0, 0, pad)).view(b_el.dtype)
        if fmt.scaling == "block":
            b_sc = F.pad(b_sc.view(torch.uint8), (0, 0, 0, pad)).view(b_sc.dtype)
    if fmt.scaling == "tensor":
        out = torch._scaled_mm(a_el, b_el.T, a_sc, b_sc, out_dtype=dtype)
    else:
        out = F.scaled_mm(
            a_el,
            b_el.T,
            _swizzle(a_sc),
            F.ScalingType.BlockWise1x32,
            _swizzle(b_sc),
            F.ScalingType.BlockWise1x32,
            swizzle_a=F.SwizzleType.SWIZZLE_32_4_4,
            swizzle_b=F.SwizzleType.SWIZZLE_32_4_4,
            output_dtype=dtype,
        )
    return out[:, :n] if pad else out


def _swizzle(scales: Tensor) -> Tensor:
    """Block scales (rows, K / 32) in cuBLAS's layout for block-scaled matmuls, flattened.

    The scale matrix, zero-padded to whole (128, 4) tiles, tile by tile; inside a tile, row
    ``r`` of column ``c`` goes to ``(r % 32, r // 32, c)`` (cuBLAS, "1D block scaling factors
    layout"; torchao's ``to_blocked``).
    """
    rows, cols = scales.shape
    tiles_r, tiles_c = -(-rows // _SCALE_ROWS), -(-cols // _SCALE_COLS)
    raw = scales.view(torch.uint8)
    raw = F.pad(raw, (0, tiles_c * _SCALE_COLS - cols, 0, tiles_r * _SCALE_ROWS - rows))
    tiles = raw.view(tiles_r, _SCALE_ROWS, tiles_c, _SCALE_COLS).permute(0, 2, 1, 3)
    swizzled = tiles.reshape(-1, 4, 32, _SCALE_COLS).transpose(1, 2).reshape(-1)
    return swizzled.view(scales.dtype)


def _pairs(w_fmt: Format, a_fmt: Format, g_fmt: Format | None) -> list[tuple[Format, Format]]:
    """The (left, right) operand formats of every matmul that runs on float8."""
    pairs = [(a_fmt, w_fmt)]
    if g_fmt is not None:
        pairs += [(g_fmt, w_fmt), (g_fmt, a_fmt)]
    return pairs


def _format_problem(w_fmt: Format, a_fmt: Format, g_fmt: Format | None) -> str | None:
    """Why these formats cannot run on float8 kernels anywhere, or ``None``."""
    for left, right in _pairs(w_fmt, a_fmt, g_fmt):
        for fmt in (left, right):
            if fmt.name not in SCALED_MM_FORMATS:
                return f"needs a float8 format, got {fmt.name!r}"
        if left.scaling != right.scaling:
            return f"cannot multiply {left.name!r} by {right.name!r} (per-tensor x block scales)"
    return None


def _device_problem(
    device: torch.device, w_fmt: Format, a_fmt: Format, g_fmt: Format | None
) -> str | None:
    """Why ``device`` has no float8 kernel for these formats, or ``None``."""
    problem = _format_problem(w_fmt, a_fmt, g_fmt)
    if problem is not None:
        return problem
    block = w_fmt.scaling == "block"
    if device.type == "cpu":
        return "torch has no block-scaled (MX) matmul on CPU" if block else None
    if device.type != "cuda":
        return f"no float8 matmul kernels on {device.type!r} devices"
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    if block and not (MX_CAPABILITY <= capability < (11, 0) and hasattr(F, "scaled_mm")):
        return f"MXFP8 matmuls need compute capability 10.x and torch>=2.10, got {capability}"
    if not block and capability < TENSORWISE_CAPABILITY:
        return f"FP8 tensor cores need compute capability 8.9 or newer, got {capability}"
    for left, right in _pairs(w_fmt, a_fmt, g_fmt):
        if left.ebits == right.ebits == 5:
            return f"cuBLAS has no {left.name!r} x {right.name!r} matmul (one must be e4m3)"
    return None


def _format_names(w_fmt: Format, a_fmt: Format, g_fmt: Format | None) -> str:
    names = {f.name for f in (w_fmt, a_fmt, g_fmt) if f is not None}
    return "/".join(sorted(names))
