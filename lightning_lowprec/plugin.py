"""Precision plugins that train a model with MX/FP8-quantized matmuls in Trainer and Fabric.

``LowPrecision`` is the Fabric plugin and ``LowPrecisionPlugin`` the Trainer's; they share one
implementation (the Trainer class subclasses the Fabric class, Lightning's own pattern for
precision plugins that serve both). Everything a user adds is one line::

    trainer = L.Trainer(plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    fabric = L.Fabric(plugins=[LowPrecision("mxfp6_e2m3")])
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from lightning_lowprec.formats import Format
from lightning_lowprec.nn import (
    DEFAULT_EXCLUDE,
    _check_patterns,
    _check_rounding,
    _resolve_formats,
    quantize_linears,
)
from lightning_lowprec.quantize import Rounding

__all__ = ["LowPrecision", "LowPrecisionPlugin"]

AUTOCAST_MODES: tuple[str, ...] = ("bf16",)
_REPR_DEFAULTS = {"include": None, "quantize_backward": False, "rounding": "even", "autocast": None}


class LowPrecision(FabricMixedPrecision):
    """Fabric precision plugin: emulated MX/FP8 matmuls in the selected Linear layers.

    ``fabric.setup(model)`` re-classes the selected ``nn.Linear`` layers into
    :class:`~lightning_lowprec.nn.QuantizedLinear` in place (see
    :func:`~lightning_lowprec.nn.quantize_linears`): the Parameter objects stay, so an optimizer
    built before ``setup`` keeps training the model, and the ``state_dict`` stays that of the
    original model, so checkpoints load anywhere. Embeddings and norms are never quantized.

    The trade-off: the quantization is emulated. It shows how a model trains with MX/FP8
    matmuls on any hardware, but it costs time (every forward rounds the input and weight of
    each quantized layer) instead of saving it.

    Mixed precision: Lightning refuses a precision string together with a precision plugin
    (``Fabric(precision="bf16-mixed", plugins=[LowPrecision(...)])`` raises "Received both
    precision=... and plugins=..."). Pass ``LowPrecision(..., autocast="bf16")`` instead: the
    forward then runs under ``torch.autocast`` in bf16 exactly as ``precision="bf16-mixed"``
    does, and the quantized operands are bf16.

    Strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...). FSDP and DeepSpeed
    accept only their own precision plugins; Lightning raises a ``TypeError`` ("The FSDP
    strategy can only work with the FSDPPrecision plugin, found LowPrecision(...)") — use DDP.

    Args:
        fmt: the format of every quantized operand, e.g. ``"mxfp6_e2m3"``; the names are in
            :data:`lightning_lowprec.FORMATS`.
        w_fmt, a_fmt, g_fmt: per-operand formats overriding ``fmt`` (weights, input
            activations, output gradients; ``g_fmt`` only with ``quantize_backward=True``).
        include: module-name patterns of the Linear layers to quantize (``None``: all).
        exclude: module-name patterns left in full precision; default: the LM head. The
            pattern rule is that of :func:`~lightning_lowprec.nn.quantize_linears`; the names
            are those of the module given to ``setup`` (for the Trainer, the LightningModule,
            e.g. ``gpt.lm_head``).
        quantize_backward: also quantize the two backward matmuls (default: straight-through,
            backward in the working dtype, as the LMD paper).
        rounding: ``"even"`` (the MX spec's round-to-nearest-even), ``"nearest"`` or
            ``"stochastic"``.
        autocast: ``None`` (the working dtype is the parameters') or ``"bf16"``.
        device: device type of the autocast (``"cuda"``, ``"cpu"``, ...); default ``"cuda"`` if
            CUDA is available, else ``"cpu"``. Only used with ``autocast``.

    Raises:
        ValueError: an unknown format, rounding or autocast mode, or a missing format; at setup,
            a model with no Linear layer selected.

    Checkpoints: ``state_dict()`` holds the settings above; the Trainer saves it in every
    checkpoint, Fabric when it is part of the saved state
    (``fabric.save(path, {"model": model, "low_precision": fabric.strategy.precision})``).
    Loading a checkpoint saved with other settings warns and keeps this plugin's settings
    (changing the format mid-training is a legitimate choice, but it should never go
    unnoticed).
    """

    def __init__(
        self,
        fmt: str | Format | None = None,
        *,
        w_fmt: str | Format | None = None,
        a_fmt: str | Format | None = None,
        g_fmt: str | Format | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
        quantize_backward: bool = False,
        rounding: Rounding = "even",
        autocast: Literal["bf16"] | None = None,
        device: str | None = None,
    ) -> None:
        self.w_fmt, self.a_fmt, self.g_fmt = _resolve_formats(
            fmt, w_fmt, a_fmt, g_fmt, quantize_backward
        )
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.quantize_backward = quantize_backward
        self.rounding = _check_rounding(rounding)
        if autocast is not None and autocast not in AUTOCAST_MODES:
            raise ValueError(
                f"Unknown autocast {autocast!r}. Valid values: None, "
                f"{', '.join(map(repr, AUTOCAST_MODES))}."
            )
        self.autocast = autocast
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if autocast is None:
            # What MixedPrecision.__init__ sets, for full precision (Lightning reads these).
            self.precision = "32-true"
            self.device, self.scaler = device, None
            self._desired_input_dtype = torch.float32
        else:
            FabricMixedPrecision.__init__(self, "bf16-mixed", device)

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Re-class the selected Linear layers of ``module`` in place; return ``module``."""
        quantize_linears(
            module,
            w_fmt=self.w_fmt,
            a_fmt=self.a_fmt,
            g_fmt=self.g_fmt,
            include=self.include,
            exclude=self.exclude,
            quantize_backward=self.quantize_backward,
            rounding=self.rounding,
        )
        return module

    def forward_context(self) -> AbstractContextManager:
        """bf16 autocast with ``autocast="bf16"``, else nothing.

        The autocast weight cache is off (as in the Trainer's own mixed precision): weights
        may change in place between forwards inside one context.
        """
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False)

    def convert_input(self, data: Any) -> Any:
        return data if self.autocast is None else super().convert_input(data)

    def convert_output(self, data: Any) -> Any:
        return data if self.autocast is None else super().convert_output(data)

    def state_dict(self) -> dict[str, Any]:
        """The settings, as plain Python values (checkpoints load with ``weights_only=True``)."""
        return {
            "w_fmt": self.w_fmt.name,
            "a_fmt": self.a_fmt.name,
            "g_fmt": None if self.g_fmt is None else self.g_fmt.name,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            "quantize_backward": self.quantize_backward,
            "rounding": self.rounding,
            "autocast": self.autocast,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Compare a checkpoint's settings with this plugin's; warn about every difference.

        This plugin's settings stay in force: they are what the running script asked for.
        """
        current = self.state_dict()
        changed = {
            key: (state_dict[key], value)
            for key, value in current.items()
            if key in state_dict and state_dict[key] != value
        }
        if changed:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            rank_zero_warn(
                f"The checkpoint was saved with other {type(self).__name__} settings; training "
                f"continues with this plugin's ({listed})."
            )

    def __repr__(self) -> str:
        """The constructor call that makes this plugin, with the defaults left out."""
        formats = {"w_fmt": self.w_fmt, "a_fmt": self.a_fmt, "g_fmt": self.g_fmt}
        formats = {key: fmt.name for key, fmt in formats.items() if fmt is not None}
        if len(set(formats.values())) == 1:
            args = [repr(self.w_fmt.name)]
        else:
            args = [f"{key}={name!r}" for key, name in formats.items()]
        defaults = {**_REPR_DEFAULTS, "exclude": list(DEFAULT_EXCLUDE)}
        args += [
            f"{key}={value!r}"
            for key, value in self.state_dict().items()
            if key in defaults and value != defaults[key]
        ]
        return f"{type(self).__name__}({', '.join(args)})"


class LowPrecisionPlugin(MixedPrecision, LowPrecision):
    """Trainer precision plugin: emulated MX/FP8 matmuls in the selected Linear layers.

    ``Trainer(plugins=[LowPrecisionPlugin("mxfp6_e2m3")])``. The same plugin as
    :class:`LowPrecision` (see there for every argument, the autocast note, strategies and
    checkpoints); this class adds the Trainer's hooks (``on_before_backward``, gradient
    clipping, the closure) and routes the shared methods to the shared implementation.

    Use ``LowPrecisionPlugin(..., autocast="bf16")`` instead of ``precision="bf16-mixed"``,
    which Lightning refuses next to any precision plugin.
    """

    __init__ = LowPrecision.__init__
    forward_context = LowPrecision.forward_context
    state_dict = LowPrecision.state_dict
    load_state_dict = LowPrecision.load_state_dict
    # Without a gradient scaler there is nothing to unscale, so fused optimizers may clip.
    clip_gradients = Precision.clip_gradients

    def convert_input(self, data: Any) -> Any:
        # The Trainer's bf16-mixed leaves batches as they are; so does this plugin.
        return data
