"""A slow, per-element reference for the MX / FP8 fake quantizer, written from the spec.

This is the test oracle for ``lightning_lowprec.quantizer``. It deliberately shares nothing with
the implementation: the format constants are hard-coded here (a test checks they agree with
``lightning_lowprec.formats.FORMATS``), every value is a Python float, and every element is
handled on its own, one operation at a time, so a reader can check each line against the text of
the OCP Microscaling Formats (MX) v1.0 specification.

Semantics (the definitive statement of what "exact" means for the quantizer):

MX formats, per block of 32 consecutive elements along the quantization axis (blocks start at
index 0; a shorter last block is logically zero-padded):

1. Work in fp32 (bf16 / fp16 inputs convert exactly to fp32 first).
2. A NaN or +-inf anywhere in the block makes every element of the block NaN.
3. ``amax = max |x_i|``; ``shared_exp = clamp(floor(log2(amax)) - emax, -127, 127)``, with
   ``floor(log2)`` of the exact value (fp32 subnormals included). An all-zero block stays zero,
   each output keeping its input's sign. Scale rule ``"rceil"`` (NVIDIA's for MXFP8, not in
   the spec) instead takes ``d = f32(amax / max)`` and ``shared_exp = clamp(ceil(log2(d)),
   -127, 127)`` (``-127`` for ``d = 0``). Either rule's exponent is then lowered, if need be,
   to the largest ``s`` with ``max * 2**s <=`` the largest finite value of the output dtype
   (fp32, bf16 or fp16), so that no grid value of the block is inf there (not in the spec,
   which has no fp32 output; only rceil ever needs it).
4. ``v_i = x_i / 2**shared_exp`` (exact).
5. Float elements: ``e_i = max(floor(log2|v_i|), emin)``, quantum ``q_i = 2**(e_i - mbits)``,
   ``k = round(|v_i| / q_i)``, ``r = min(k * q_i, max)`` (saturation),
   ``result_i = copysign(r, x_i) * 2**shared_exp``. MXINT8: fixed quantum ``2**-6``.
6. The exact result is cast to the input dtype, rounding to nearest even.

Per-tensor formats (``fp8_*``), over the whole tensor, all arithmetic in IEEE fp32:

1. A NaN or +-inf anywhere makes every output NaN; an all-zero tensor stays (signed) zero.
2. ``scale = f32(max / max(amax, max * 2**-126))``; ``y_i = f32(x_i * scale)``; ``y_i`` is rounded
   onto the element grid as in MX step 5 with ``shared_exp = 0``; ``result_i = f32(r_i / scale)``.

Rounding modes, applied to the magnitude ``a = |v| / q >= 0``:

- ``"even"``: to nearest, ties to even;
- ``"nearest"``: to nearest, ties away from zero (``floor(a + 0.5)``);
- ``"stochastic"``: ``floor(a) + 1`` with probability ``a - floor(a)``, else ``floor(a)``. The
  reference takes the uniform draw ``u`` in ``[0, 1)`` explicitly and rounds up iff
  ``u < a - floor(a)``: ``u = 0`` gives the upper neighbour (the ceiling), ``u -> 1`` the lower.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

BLOCK_SIZE = 32
"""Elements per shared E8M0 scale in every MX format."""

SCALE_EXP_MIN = -127
SCALE_EXP_MAX = 127
"""Range of the E8M0 shared exponent."""


@dataclass(frozen=True)
class RefFormat:
    """The constants of one element format, as the reference uses them."""

    name: str
    per_tensor: bool
    integer: bool
    mbits: int  # explicit mantissa bits; for MXINT8 the fraction bits (quantum 2**-mbits)
    emin: int  # exponent of the smallest normal element (float elements only)
    emax: int  # exponent of the largest normal element
    max: float  # largest finite element magnitude


# Written out by hand from the OCP MX v1.0 tables (and the FP8 E4M3 / E5M2 definitions), not
# derived from bit widths, so that a slip in either table shows up as a disagreement.
REFERENCE_FORMATS: dict[str, RefFormat] = {
    f.name: f
    for f in (
        #         name          per_tensor integer mbits emin emax   max
        RefFormat("mxfp8_e4m3", False, False, 3, -6, 8, 448.0),
        RefFormat("mxfp8_e5m2", False, False, 2, -14, 15, 57344.0),
        RefFormat("mxfp6_e3m2", False, False, 2, -2, 4, 28.0),
        RefFormat("mxfp6_e2m3", False, False, 3, 0, 2, 7.5),
        RefFormat("mxfp4_e2m1", False, False, 1, 0, 2, 6.0),
        RefFormat("mxint8", False, True, 6, 0, 0, 127.0 / 64.0),
        RefFormat("fp8_e4m3", True, False, 3, -6, 8, 448.0),
        RefFormat("fp8_e5m2", True, False, 2, -14, 15, 57344.0),
    )
}

DTYPE_MAX: dict[torch.dtype, float] = {
    torch.float32: (2 - 2.0**-23) * 2.0**127,
    torch.bfloat16: (2 - 2.0**-7) * 2.0**127,
    torch.float16: (2 - 2.0**-10) * 2.0**15,
}
"""The largest finite value of each output dtype, by hand from the IEEE / bfloat16 layouts."""

ROUNDING_MODES = ("even", "nearest", "stochastic")
SCALE_RULES = ("floor", "rceil")


# --------------------------------------------------------------------------------------------
# Scalar helpers
# --------------------------------------------------------------------------------------------


def f32(v: float) -> float:
    """Round a Python float (a double) to the nearest fp32 value, ties to even.

    A single ``+ - * /`` of two fp32 values computed in double and rounded once with this is the
    correctly rounded fp32 result, since 53 >= 2 * 24 + 2.
    """
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:  # struct refuses values that round to +-inf; IEEE gives inf
        return math.copysign(math.inf, v)


def floor_log2(v: float) -> int:
    """``floor(log2(v))`` of the exact value of a positive finite float (subnormals too)."""
    assert v > 0 and math.isfinite(v)
    _, e = math.frexp(v)  # v = m * 2**e with 0.5 <= m < 1
    return e - 1


def ceil_log2(v: float) -> int:
    """``ceil(log2(v))`` of the exact value of a positive finite float (subnormals too)."""
    m, e = math.frexp(v)  # v = m * 2**e with 0.5 <= m < 1
    return e - 1 if m == 0.5 else e


def round_magnitude(a: float, rounding: str, u: float | None = None) -> float:
    """Round ``a >= 0`` to an integer by ``rounding``; ``u`` is the uniform draw (stochastic)."""
    assert a >= 0
    low = math.floor(a)
    frac = a - low  # exact: a and floor(a) share their leading bits
    if rounding == "even":
        if frac > 0.5:
            return low + 1.0
        if frac < 0.5:
            return float(low)
        return float(low) if low % 2 == 0 else low + 1.0
    if rounding == "nearest":
        return low + 1.0 if frac >= 0.5 else float(low)
    if rounding == "stochastic":
        assert u is not None and 0.0 <= u <= 1.0
        return low + 1.0 if u < frac else float(low)
    raise ValueError(f"unknown rounding {rounding!r}")


def round_element(v: float, fmt: RefFormat, rounding: str, u: float | None = None) -> float:
    """Round ``v`` (already divided by the scale) onto ``fmt``'s element grid, with saturation.

    Returns the signed element value; a result of zero keeps the sign of ``v``.
    """
    mag = abs(v)
    if fmt.integer:
        quantum = 2.0**-fmt.mbits
    else:
        e = fmt.emin if mag == 0 else max(floor_log2(mag), fmt.emin)
        quantum = 2.0 ** (e - fmt.mbits)
    k = round_magnitude(mag / quantum, rounding, u)  # mag / quantum: exact (power of two)
    r = min(k * quantum, fmt.max)
    return math.copysign(r, v)


# --------------------------------------------------------------------------------------------
# One group
# --------------------------------------------------------------------------------------------


def shared_exponent(amax: float, fmt: RefFormat, scale_rule: str) -> int:
    """The block's shared exponent before E8M0's clamp, for ``amax > 0``."""
    if scale_rule == "floor":
        return floor_log2(amax) - fmt.emax
    if scale_rule == "rceil":
        d = f32(amax / fmt.max)
        return SCALE_EXP_MIN if d == 0 else ceil_log2(d)
    raise ValueError(f"unknown scale rule {scale_rule!r}")


def finite_exponent_cap(fmt: RefFormat, dtype: torch.dtype) -> int:
    """The largest ``s`` with ``fmt.max * 2**s <= DTYPE_MAX[dtype]`` (exact: powers of two)."""
    s = 0
    while fmt.max * 2.0 ** (s + 1) <= DTYPE_MAX[dtype]:
        s += 1
    while fmt.max * 2.0**s > DTYPE_MAX[dtype]:
        s -= 1
    return s


def _mx_block(
    block: list[float],
    fmt: RefFormat,
    rounding: str,
    rand: list[float] | None,
    scale_rule: str,
    dtype: torch.dtype,
):
    if any(math.isnan(x) or math.isinf(x) for x in block):
        return [math.nan] * len(block)
    amax = max(abs(x) for x in block)
    if amax == 0:
        return [math.copysign(0.0, x) for x in block]
    shared_exp = shared_exponent(amax, fmt, scale_rule)
    shared_exp = min(max(shared_exp, SCALE_EXP_MIN), SCALE_EXP_MAX)
    shared_exp = min(shared_exp, finite_exponent_cap(fmt, dtype))
    scale = 2.0**shared_exp  # exact in double: 2**-127 .. 2**127
    out = []
    for i, x in enumerate(block):
        v = x / scale  # exact: division by a power of two well inside double range
        r = round_element(v, fmt, rounding, None if rand is None else rand[i])
        out.append(r * scale)  # exact; copysign already applied, -0.0 * scale stays -0.0
    return out


def _per_tensor(values: list[float], fmt: RefFormat, rounding: str, rand: list[float] | None):
    if any(math.isnan(x) or math.isinf(x) for x in values):
        return [math.nan] * len(values)
    amax = max(abs(x) for x in values)
    if amax == 0:
        return [math.copysign(0.0, x) for x in values]
    amax_c = max(amax, fmt.max * 2.0**-126)
    scale = f32(fmt.max / amax_c)
    out = []
    for i, x in enumerate(values):
        y = f32(x * scale)
        r = round_element(y, fmt, rounding, None if rand is None else rand[i])
        out.append(f32(r / scale))  # r carries the sign (zeros included)
    return out


def reference_quantize(
    values: list[float],
    fmt_name: str,
    rounding: str,
    rand: list[float] | None = None,
    scale_rule: str = "floor",
    dtype: torch.dtype = torch.float32,
) -> list[float]:
    """Fake-quantize one 1-D group of exact fp32 values; returns exact values as Python floats.

    For an MX format ``values`` is one line along the quantization axis (any length, split into
    blocks of 32 from index 0); for a per-tensor format it is every value of the tensor. ``rand``
    holds one uniform draw in ``[0, 1]`` per value for ``rounding="stochastic"``.

    The values returned for fp32 inputs are the exact results; for bf16 / fp16 inputs cast them
    with :func:`to_dtype`. ``scale_rule`` applies to the MX formats only, as does ``dtype``,
    the output dtype, whose range caps the shared exponent (MX step 3).
    """
    fmt = REFERENCE_FORMATS[fmt_name]
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}")
    if rounding == "stochastic":
        assert rand is not None and len(rand) == len(values)
    values = [float(x) for x in values]
    if fmt.per_tensor:
        return _per_tensor(values, fmt, rounding, rand)
    out: list[float] = []
    for start in range(0, len(values), BLOCK_SIZE):
        block_rand = None if rand is None else rand[start : start + BLOCK_SIZE]
        block = values[start : start + BLOCK_SIZE]
        out.extend(_mx_block(block, fmt, rounding, block_rand, scale_rule, dtype))
    return out


# --------------------------------------------------------------------------------------------
# Tensors (plain Python iteration over lines; the reference's only torch use is the final cast)
# --------------------------------------------------------------------------------------------


def to_dtype(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The exact results as a tensor of ``dtype``, rounded to nearest even (spec step 6)."""
    # The results are exact fp32 values, so going through float64 rounds only once.
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def reference_quantize_tensor(
    x: torch.Tensor,
    fmt_name: str,
    axis: int = -1,
    rounding: str = "even",
    rand: torch.Tensor | None = None,
    scale_rule: str = "floor",
) -> torch.Tensor:
    """Apply :func:`reference_quantize` to a tensor: per line along ``axis`` (MX) or as a whole.

    ``rand`` (same shape as ``x``) holds the uniform draws for stochastic rounding.
    """
    fmt = REFERENCE_FORMATS[fmt_name]
    exact = x.detach().to(torch.float32)  # bf16 / fp16 -> fp32 is exact
    if rand is not None:
        rand = rand.to(torch.float64)
    if fmt.per_tensor or x.dim() == 0:
        flat = exact.reshape(-1).tolist()
        flat_rand = None if rand is None else rand.reshape(-1).tolist()
        out = reference_quantize(flat, fmt_name, rounding, flat_rand, scale_rule, x.dtype)
        return to_dtype(out, x.dtype).reshape(x.shape)
    axis = axis % x.dim()
    lines = exact.movedim(axis, -1)
    moved_shape = lines.shape
    lines = lines.reshape(-1, moved_shape[-1])
    rand_lines = None if rand is None else rand.movedim(axis, -1).reshape(lines.shape).tolist()
    out = []
    for i, line in enumerate(lines.tolist()):
        line_rand = None if rand_lines is None else rand_lines[i]
        out.append(reference_quantize(line, fmt_name, rounding, line_rand, scale_rule,
                                      x.dtype))
    result = to_dtype([v for line in out for v in line], x.dtype)
    return result.reshape(moved_shape).movedim(-1, axis).contiguous()


def element_grid(fmt_name: str) -> list[float]:
    """Every non-negative finite element value of a format, ascending (for tests)."""
    fmt = REFERENCE_FORMATS[fmt_name]
    if fmt.integer:
        return [k / 64.0 for k in range(128)]
    grid = {0.0}
    for e in range(fmt.emin, fmt.emax + 1):
        quantum = 2.0 ** (e - fmt.mbits)
        start = 1 if e == fmt.emin else 2**fmt.mbits  # subnormals share emin's quantum
        for k in range(start, 2 ** (fmt.mbits + 1)):
            if k * quantum <= fmt.max:
                grid.add(k * quantum)
    return sorted(grid)
