"""Layers that multiply like ``nn.Linear`` without being one, as the plugin's conversion meets them.

:func:`~lightning_lowprec.nn.quantize_linears` re-classes exact ``nn.Linear`` layers only. Three
kinds of layer would otherwise run unquantized without anyone noticing:

* Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``):
  a Linear with its weight stored transposed, ``[in, out]``, ``y = x @ W + b``.
  :func:`quantize_conv1ds` re-classes it in place to quantize exactly as a
  :class:`~lightning_lowprec.nn.QuantizedLinear` with weight ``W.T`` (blocks along the
  ``in`` axis of both operands); parameters and ``state_dict`` stay Conv1D's. It is found by
  class name and module (``Conv1D`` from ``transformers``), so transformers is never
  imported here.
* ``nn.TransformerEncoderLayer`` in eval mode without gradients takes PyTorch's fused "fast
  path", ``torch._transformer_encoder_layer_fwd``, which reads ``linear1``/``linear2``'s raw
  weights and skips their forwards: validation would run unquantized. The fast path is off
  for a layer with a forward hook, so :func:`keep_quantized_paths` gives each such layer with
  a quantized Linear a no-op pre-hook.
* Everything else with a 2-D weight that is not an embedding: ``nn.MultiheadAttention``'s
  fused ``in_proj_weight`` (and its ``out_proj``, an ``nn.Linear`` subclass), other
  ``nn.Linear`` subclasses, custom projections. :func:`warn_unquantized` names them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_lowprec.formats import Format
from lightning_lowprec.nn import QuantizedLinear, _matches
from lightning_lowprec.quantizer import Rounding, ScaleRule
from lightning_lowprec.scaled_mm import Backend

__all__ = ["keep_quantized_paths", "quantize_conv1ds", "warn_unquantized"]

_NOT_MATMUL = (nn.Embedding, nn.EmbeddingBag, parametrize.ParametrizationList)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) Hugging Face's ``Conv1D``, by name and package."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(module).__mro__
    )


class QuantizedConv1D(nn.Module):
    """The behaviour a re-classed HF ``Conv1D`` gets (see the module doc); never built directly.

    The class a layer is re-classed into derives from its own class and this one, so
    ``isinstance(layer, Conv1D)`` still holds and the parameters stay where they were.
    """

    weight: Tensor
    bias: Tensor | None
    nf: int
    _configure = QuantizedLinear._configure
    _quantized_linear = QuantizedLinear._quantized_linear

    def forward(self, x: Tensor) -> Tensor:
        return QuantizedLinear._matmul(self, x, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, w_fmt={self.w_fmt.name}, a_fmt={self.a_fmt.name}"


def quantize_conv1ds(
    model: nn.Module,
    *,
    w_fmt: Format,
    a_fmt: Format,
    g_fmt: Format | None,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    quantize_backward: bool,
    rounding: Rounding,
    backend: Backend,
    grad_rounding: Rounding | None = None,
    scale_rule: ScaleRule = "floor",
) -> list[str]:
    """Re-class the selected HF ``Conv1D`` layers of ``model`` in place (validated settings,
    the pattern rule of :func:`~lightning_lowprec.nn.quantize_linears`); return their names."""
    selected = []
    for name, module in model.named_modules():
        if not is_hf_conv1d(module) or not _selected(name, include, exclude):
            continue
        if not isinstance(module, QuantizedConv1D):
            cls = type(module)
            module.__class__ = type(f"Quantized{cls.__name__}", (QuantizedConv1D, cls), {})
        module._configure(w_fmt, a_fmt, g_fmt, quantize_backward, rounding, backend,
                          grad_rounding, scale_rule)
        selected.append(name)
    return selected


def keep_quantized_paths(model: nn.Module) -> None:
    """Turn off the eval fast path of every ``nn.TransformerEncoderLayer`` holding a quantized
    layer (see the module doc). Idempotent."""
    for layer in model.modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        if any(isinstance(m, QuantizedLinear) for m in layer.modules()):
            if _no_fast_path not in layer._forward_pre_hooks.values():
                layer.register_forward_pre_hook(_no_fast_path)


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence keeps PyTorch's fused path off."""


def warn_unquantized(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]
) -> list[str]:
    """Warn naming the layers the selection covers whose 2-D weights stay unquantized.

    Returns:
        Their qualified names, each with the 2-D parameter (``attn.in_proj_weight``).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedConv1D, *_NOT_MATMUL)):
            continue
        if type(module) is nn.Linear or not _selected(name, include, exclude):
            continue  # a plain Linear not quantized was left out on purpose
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 2:
                found.append(f"{name}.{pname}" if name else pname)
    if found:
        shown = ", ".join(found[:12]) + (f", ... ({len(found)} in all)" if len(found) > 12 else "")
        warnings.warn(
            f"These 2-D weights of {type(model).__name__} stay unquantized: {shown}. Only exact "
            "nn.Linear layers (and Hugging Face Conv1D) are quantized; nn.MultiheadAttention's "
            "fused in_proj_weight, nn.Linear subclasses and custom projections run in full "
            "precision. Excluding a layer (exclude=...) also silences it; LoRA adapters "
            "(lora_A, lora_B) are 2-D weights of this kind.",
            stacklevel=3,
        )
    return found


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    return (include is None or _matches(name, include)) and not _matches(name, exclude)
