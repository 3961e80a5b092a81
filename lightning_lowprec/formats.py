"""The number formats: one table of constants, named once.

MX formats follow the OCP Microscaling Formats (MX) v1.0 specification: a block of 32 elements
shares one E8M0 scale ``X = 2**shared_exp`` with ``shared_exp = floor(log2(amax)) - emax``
(clamped to E8M0's range [-127, 127]); each element is rounded into a narrow element format and
saturates at that format's largest finite value. The per-tensor FP8 formats instead scale the
whole tensor by ``max / amax`` so that the tensor's largest magnitude maps to the format's max.

All values are in units of the element format (before the shared scale is applied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["FORMATS", "Format", "parse"]

MX_BLOCK_SIZE = 32
"""Elements per shared scale in every MX format (OCP MX v1.0, section 5)."""

E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
"""Exponent range of the E8M0 shared scale; the remaining encoding (0xFF) is NaN."""


@dataclass(frozen=True)
class Format:
    """One number format.

    Attributes:
        name: the public name, e.g. ``"mxfp6_e2m3"``.
        scaling: ``"block"`` (MX: one E8M0 scale per ``block_size`` elements) or ``"tensor"``
            (one fp32 scale for the whole tensor, ``max / amax``).
        element: ``"float"`` or ``"int"`` (MXINT8: two's complement with an implicit 2**-6).
        ebits: exponent bits of the element (0 for integers).
        mbits: explicit mantissa bits (for MXINT8: fraction bits, 6).
        bias: exponent bias of the element format.
        emax: exponent of the largest normal element, the ``emax_elem`` of the spec.
        emin: exponent of the smallest normal element (``1 - bias``); values below it are
            subnormal with the fixed quantum ``2**(emin - mbits)``.
        max: largest finite element magnitude; rounding saturates here.
        block_size: elements per shared scale (``None`` for per-tensor formats).
        torch_dtype: the native torch dtype of the element, where torch has one.
    """

    name: str
    scaling: Literal["block", "tensor"]
    element: Literal["float", "int"]
    ebits: int
    mbits: int
    bias: int
    emax: int
    emin: int
    max: float
    block_size: int | None
    torch_dtype: torch.dtype | None

    @property
    def bits(self) -> int:
        """Storage bits of one element (sign included), not counting the shared scale."""
        return 1 + self.ebits + self.mbits if self.element == "float" else 8

    @property
    def min_normal(self) -> float:
        """Smallest positive normal element (``2**emin``); for MXINT8 the quantum ``2**-6``."""
        return 2.0**self.emin if self.element == "float" else 2.0**-self.mbits

    @property
    def min_subnormal(self) -> float:
        """Smallest positive element: the quantum below ``min_normal``."""
        return 2.0 ** (self.emin - self.mbits) if self.element == "float" else 2.0**-self.mbits


def _float(name, scaling, ebits, mbits, emax, max_, dtype=None):
    bias = 2 ** (ebits - 1) - 1
    return Format(
        name, scaling, "float", ebits, mbits, bias, emax, 1 - bias, max_,
        MX_BLOCK_SIZE if scaling == "block" else None, dtype,
    )


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        # name           scaling  ebits mbits emax  max
        # E4M3 spends only S.1111.111 on NaN, so its emax (8) is one above the IEEE-style
        # 2**ebits - 2 - bias; E5M2 keeps IEEE inf/NaN; the FP6/FP4 elements have neither.
        _float("mxfp8_e4m3", "block", 4, 3, 8, 448.0, torch.float8_e4m3fn),
        _float("mxfp8_e5m2", "block", 5, 2, 15, 57344.0, torch.float8_e5m2),
        _float("mxfp6_e3m2", "block", 3, 2, 4, 28.0),
        _float("mxfp6_e2m3", "block", 2, 3, 2, 7.5),
        _float("mxfp4_e2m1", "block", 2, 1, 2, 6.0),
        # MXINT8: 8-bit two's complement scaled by 2**-6, so elements are k/64. Saturation is
        # symmetric at +-127/64 (the spec allows leaving -2.0 unused; microxcaling does so).
        Format("mxint8", "block", "int", 0, 6, 0, 0, 0, 127 / 64, MX_BLOCK_SIZE, None),
        _float("fp8_e4m3", "tensor", 4, 3, 8, 448.0, torch.float8_e4m3fn),
        _float("fp8_e5m2", "tensor", 5, 2, 15, 57344.0, torch.float8_e5m2),
    )
}
"""Every supported format by name."""


def parse(fmt: str | Format) -> Format:
    """Return the :class:`Format` called ``fmt`` (a ``Format`` passes through unchanged).

    Raises:
        ValueError: ``fmt`` is not a known name; the message lists every valid name.
    """
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown number format {fmt!r}. Valid formats: {', '.join(FORMATS)}."
        ) from None
