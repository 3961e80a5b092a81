"""lightning-lowprec: stable low-precision training for PyTorch Lightning and LitGPT."""

from lightning_lowprec.formats import FORMATS, Format, parse
from lightning_lowprec.fsdp import fully_shard_blocks
from lightning_lowprec.litgpt import placement as _litgpt_placement  # noqa: F401 (registers it)
from lightning_lowprec.nn import QuantizedLinear, quantize_linears
from lightning_lowprec.optim import LMD, Madam, MPlusAdam
from lightning_lowprec.plugin import LowPrecision, LowPrecisionPlugin
from lightning_lowprec.quantizer import quantize, quantize_ste

__all__ = [
    "FORMATS",
    "Format",
    "LMD",
    "LowPrecision",
    "LowPrecisionPlugin",
    "MPlusAdam",
    "Madam",
    "fully_shard_blocks",
    "QuantizedLinear",
    "parse",
    "quantize",
    "quantize_linears",
    "quantize_ste",
]

__version__ = "0.1.0.dev0"
