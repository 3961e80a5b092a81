"""lightning-lowprec: stable low-precision training for PyTorch Lightning and LitGPT."""

from lightning_lowprec.formats import FORMATS, Format, parse
from lightning_lowprec.quantize import quantize, quantize_ste

__all__ = [
    "FORMATS",
    "Format",
    "parse",
    "quantize",
    "quantize_ste",
]

__version__ = "0.1.0.dev0"
