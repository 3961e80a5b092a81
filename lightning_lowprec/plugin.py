"""Precision plugins that train a model with MX/FP8-quantized matmuls in Trainer and Fabric.

``LowPrecision`` is the Fabric plugin and ``LowPrecisionPlugin`` the Trainer's; they share one
implementation (the Trainer class subclasses the Fabric class, Lightning's own pattern for
precision plugins that serve both). Everything a user adds is one line::

    trainer = L.Trainer(plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    fabric = L.Fabric(plugins=[LowPrecision("mxfp6_e2m3")])

With a posterior optimizer (:class:`~lightning_lowprec.LMD`) the same plugins also run every
training forward and backward at a sample of the posterior and keep the point estimate in the
parameters at rest; see :class:`LowPrecision`, "Posterior sampling".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.plugins.precision import Precision
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowprec.callbacks.merge import FACTORS_KEY, unmerge_checkpoint
from lightning_lowprec.formats import Format
from lightning_lowprec.fsdp import fsdp_modules, mark_sharded_multipliers, refuse_fsdp1
from lightning_lowprec.linear_like import (
    keep_quantized_paths,
    quantize_conv1ds,
    warn_unquantized,
)
from lightning_lowprec.nn import (
    DEFAULT_EXCLUDE,
    FormatMap,
    _check_grad_rounding,
    _check_mapping_alone,
    _check_patterns,
    _check_rounding,
    _check_scale_rule,
    _resolve_formats,
    check_format_map,
    quantize_linears,
)
from lightning_lowprec.optim.groups import without_multipliers
from lightning_lowprec.posterior import is_posterior
from lightning_lowprec.quantizer import Rounding, ScaleRule
from lightning_lowprec.sampling import PosteriorSampler
from lightning_lowprec.scaled_mm import Backend, check_backend

__all__ = ["LowPrecision", "LowPrecisionPlugin"]

AUTOCAST_MODES: tuple[str, ...] = ("bf16",)
PARAM_DTYPES: tuple[str, ...] = ("bf16",)
_REPR_DEFAULTS = {
    "include": None,
    "quantize_backward": False,
    "rounding": "even",
    "grad_rounding": None,
    "scale_rule": "floor",
    "backend": "auto",
    "autocast": None,
    "param_dtype": None,
    "sample": True,
}


class LowPrecision(FabricPrecision):
    """Fabric precision plugin: emulated MX/FP8 matmuls in the selected Linear layers.

    ``fabric.setup(model)`` re-classes the selected ``nn.Linear`` layers into
    :class:`~lightning_lowprec.nn.QuantizedLinear` in place (see
    :func:`~lightning_lowprec.nn.quantize_linears`): the Parameter objects stay, so an optimizer
    built before ``setup`` keeps training the model, and the ``state_dict`` stays that of the
    original model, so checkpoints load anywhere. Embeddings and norms are never quantized.

    The trade-off: by default (``backend="auto"``) the quantization is emulated unless the
    GPU has FP8 kernels for the format (per-tensor FP8 on compute capability 8.9+, MXFP8 on
    10.x). Emulation shows how a model trains with MX/FP8 matmuls on any hardware, but it costs
    time (every forward rounds the input and weight of each quantized layer) instead of saving
    it; the ``scaled_mm`` backend multiplies the same quantized values on FP8 tensor cores.

    Mixed precision: Lightning refuses a precision string together with a precision plugin
    (``Fabric(precision="bf16-mixed", plugins=[LowPrecision(...)])`` raises "Received both
    precision=... and plugins=..."). Pass ``LowPrecision(..., autocast="bf16")`` instead: the
    forward then runs under ``torch.autocast`` in bf16 exactly as ``precision="bf16-mixed"``
    does, and the quantized operands are bf16. For ``precision="bf16-true"`` (parameters
    stored in bf16, half the memory, no fp32 copy anywhere) pass ``param_dtype="bf16"``.

    Strategies: single device, DDP (``"ddp"``, ``"ddp_spawn"``, ...) and FSDP2
    (``ModelParallelStrategy(lightning_lowprec.fully_shard_blocks, data_parallel_size=N,
    tensor_parallel_size=1)``, see :mod:`lightning_lowprec.fsdp`). ``FSDPStrategy`` (FSDP1)
    raises a ``TypeError`` naming these two (:data:`~lightning_lowprec.fsdp.FSDP1_MESSAGE`);
    DeepSpeed accepts only its own precision plugins.

    Posterior sampling: when the model is trained by a posterior optimizer (one that offers
    :class:`~lightning_lowprec.posterior.PosteriorOptimizer`, e.g. :class:`~lightning_lowprec.LMD`)
    every training forward and its backward run at this optimizer step's sample ``theta`` of
    the posterior (quantized like any weight), so the optimizer updates from the gradient at
    the sample; after each backward the parameters hold the point estimate again. The sample
    of a step is a pure function of the optimizer's state, so every gradient-accumulation
    micro-batch and every DDP rank sees the same one, and a resumed run draws the same samples.
    At rest (between steps, in validation, test and predict, when a checkpoint is saved, after
    ``fit``, after an exception) the parameters hold the point estimate: checkpoints,
    ``model.state_dict()`` and exports need no extra step. Plain optimizers are unaffected.

    * Fabric: a *training forward* is a forward of a set-up module with gradients enabled
      while that module is in training mode; it draws the sample of that module's posterior
      optimizers, and ``fabric.backward(loss)`` (mandatory with this plugin) restores the
      point estimate. Any other forward (``eval()`` or ``torch.no_grad()``) of a module runs
      at its point estimate, also while another set-up module (a critic, a value head)
      trains. ``optimizer.step()`` needs nothing extra; with gradient accumulation every
      micro-batch's forward redraws the same sample. A forward with no ``fabric.backward``
      after it (a skipped NaN loss, Ctrl-C) leaves no trace: ``model.state_dict()`` and
      ``fabric.save`` read the point estimate whatever the parameters hold
      (:mod:`~lightning_lowprec.sampling`).
    * Trainer, automatic optimisation: ``training_step`` runs at the sample and its backward
      restores the point estimate; ``accumulate_grad_batches`` shares the step's sample.
    * Trainer, manual optimisation: nothing extra to call either. The whole ``training_step``
      runs at the sample (``self.manual_backward(loss)`` as usual); each posterior
      ``opt.step()`` updates from the gradient at the sample and draws the next step's sample,
      so later forwards in the same ``training_step`` are sampled too; the point estimate is
      back when ``training_step`` returns.

    Args:
        fmt: the format of every quantized operand, e.g. ``"mxfp6_e2m3"``; the names are in
            :data:`lightning_lowprec.FORMATS`. ``None`` with no per-operand format quantizes
            nothing: the plugin then only does posterior sampling. A mapping
            ``{pattern: format}`` (:data:`~lightning_lowprec.nn.FormatMap`) gives each layer
            its own format, e.g. from :func:`~lightning_lowprec.policy.recommend_formats`.
        w_fmt: the weights' format, overriding ``fmt``.
        a_fmt: the input activations' format, overriding ``fmt``.
        g_fmt: the output gradients' format, overriding ``fmt``; only with
            ``quantize_backward=True``.
        include: module-name patterns of the Linear layers to quantize (``None``: all).
        exclude: module-name patterns left in full precision; default: the LM head. The
            pattern rule is that of :func:`~lightning_lowprec.nn.quantize_linears`; the names
            are those of the module given to ``setup`` (for the Trainer, the LightningModule,
            e.g. ``gpt.lm_head``).
        quantize_backward: also quantize the two backward matmuls (default: straight-through,
            backward in the working dtype, as the LMD paper).
        rounding: ``"even"`` (the MX spec's round-to-nearest-even), ``"nearest"`` or
            ``"stochastic"``: of the forward operands (and of the gradient unless
            ``grad_rounding`` is given).
        grad_rounding: the output gradients' rounding, ``None`` (default: ``rounding``) or a
            mode; only with ``quantize_backward=True``. ``rounding="even",
            grad_rounding="stochastic"`` is the common MX recipe (unbiased gradients).
        scale_rule: the MX block scales, ``"floor"`` (the OCP spec's, default) or ``"rceil"``
            (NVIDIA's and torchao's MXFP8 rule); see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        backend: ``"auto"`` (default: real FP8 matmuls where the GPU has them for the
            format, else emulated), ``"emulated"`` or ``"scaled_mm"``; see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        autocast: ``None`` (the working dtype is the parameters') or ``"bf16"``.
        param_dtype: ``None`` (parameters as the model made them) or ``"bf16"``: Lightning's
            ``"bf16-true"``. ``setup`` converts the model to bf16, ``init_module()`` creates
            bf16 tensors, forwards run with bf16 as the default dtype, floating inputs are cast
            to bf16 and outputs back to fp32. The optimizers here keep fp32 state beside bf16
            weights (M+Adam with ``storage=None`` rounds its update into them: no fp32
            master). Not combined with ``autocast``.
        device: device type of the autocast (``"cuda"``, ``"cpu"``, ...); default: that of the
            model's parameters when a forward starts. Only used with ``autocast``.
        sample: with a posterior optimizer, train at samples (``True``, the method) or at the
            point estimate (``False``: the optimizer's deterministic dynamics, the paper's
            ablation). No effect on plain optimizers.

    Raises:
        ValueError: an unknown format, rounding (or grad_rounding without
            ``quantize_backward=True``), scale rule, autocast mode or param_dtype, ``autocast``
            with ``param_dtype``, a format missing for one operand, or
            ``include``/``quantize_backward`` without a format; at setup, a model with no
            Linear layer selected.

    Checkpoints: ``state_dict()`` holds the settings above; the Trainer saves it in every
    checkpoint, Fabric when it is part of the saved state
    (``fabric.save(path, {"model": model, "low_precision": fabric.strategy.precision})``).
    Loading a checkpoint saved with other settings warns and keeps this plugin's settings
    (changing the format mid-training is a legitimate choice, but it should never go
    unnoticed).
    """

    def __init__(
        self,
        fmt: str | Format | FormatMap | None = None,
        *,
        w_fmt: str | Format | None = None,
        a_fmt: str | Format | None = None,
        g_fmt: str | Format | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
        quantize_backward: bool = False,
        rounding: Rounding = "even",
        backend: Backend = "auto",
        autocast: Literal["bf16"] | None = None,
        device: str | None = None,
        sample: bool = True,
        param_dtype: Literal["bf16"] | None = None,
        grad_rounding: Rounding | None = None,
        scale_rule: ScaleRule = "floor",
    ) -> None:
        self.w_fmt: Format | None
        self.a_fmt: Format | None
        self.g_fmt: Format | None
        self.fmt_map = None if not isinstance(fmt, Mapping) else check_format_map(fmt)
        if self.fmt_map is not None:
            _check_mapping_alone(w_fmt, a_fmt, g_fmt)
            self.w_fmt = self.a_fmt = self.g_fmt = None
        elif fmt is None and w_fmt is None and a_fmt is None and g_fmt is None:
            if include is not None or quantize_backward:
                raise ValueError(
                    "include and quantize_backward select what to quantize: pass fmt too (with "
                    "fmt=None the plugin quantizes nothing and only does posterior sampling)."
                )
            self.w_fmt = self.a_fmt = self.g_fmt = None
        else:
            self.w_fmt, self.a_fmt, self.g_fmt = _resolve_formats(
                fmt, w_fmt, a_fmt, g_fmt, quantize_backward
            )
        if not isinstance(sample, bool):
            raise ValueError(f"sample must be True or False, got {sample!r}.")
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.quantize_backward = quantize_backward
        self.rounding = _check_rounding(rounding)
        self.grad_rounding = _check_grad_rounding(grad_rounding, rounding, quantize_backward)
        self.scale_rule = _check_scale_rule(scale_rule)
        self.backend = check_backend(backend, self.w_fmt, self.a_fmt, self.g_fmt)
        for f in set((self.fmt_map or {}).values()) - {None}:
            check_backend(backend, f, f, f if quantize_backward else None)
        if autocast is not None and autocast not in AUTOCAST_MODES:
            raise ValueError(
                f"Unknown autocast {autocast!r}. Valid values: None, "
                f"{', '.join(map(repr, AUTOCAST_MODES))}."
            )
        self.autocast = autocast
        if param_dtype is not None and param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"Unknown param_dtype {param_dtype!r}. Valid values: None, "
                f"{', '.join(map(repr, PARAM_DTYPES))}."
            )
        if param_dtype is not None and autocast is not None:
            raise ValueError(
                f"param_dtype={param_dtype!r} already stores and runs everything in bf16 "
                f"(Lightning's 'bf16-true'); autocast={autocast!r} is 'bf16-mixed'. Pass one."
            )
        self.param_dtype = param_dtype
        # Lightning reads ``precision`` (e.g. ``trainer.precision``); the rest is ours.
        self.precision = {None: "32-true", "bf16": "bf16-true"}[param_dtype]
        if autocast is not None:
            self.precision = "bf16-mixed"
        self.device = device
        self._sampler = PosteriorSampler(sample)

    @property
    def sample(self) -> bool:
        """Whether a posterior optimizer's training forwards run at samples (see ``sample``)."""
        return self._sampler.sample

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Re-class the selected Linear layers of ``module`` in place; return ``module``.

        With ``param_dtype`` the module is first converted to it; with ``fmt=None`` nothing is
        re-classed. Layers whose 2-D weights stay unquantized although they multiply like a
        Linear (``nn.MultiheadAttention``'s fused input projection, and others) are named in a
        warning. Either way the plugin's sampler attaches to the module: Fabric decides at
        each of its forwards whether it runs at a sample, and no ``state_dict`` of it can
        hold one.
        """
        self._convert(module)
        self._sampler.attach(module, per_forward=True)
        return module

    def _convert(self, module: nn.Module) -> None:
        """The dtype and the quantization of ``module``: the one place the formats apply."""
        if self.param_dtype is not None:
            module.to(dtype=torch.bfloat16)
        if self.fmt_map is not None:
            quantize_linears(
                module,
                self.fmt_map,
                include=self.include,
                exclude=self.exclude,
                quantize_backward=self.quantize_backward,
                rounding=self.rounding,
                backend=self.backend,
                grad_rounding=self.grad_rounding,
                scale_rule=self.scale_rule,
            )
            keep_quantized_paths(module)
            warn_unquantized(module, self.include, self.exclude)
            return
        if self.w_fmt is None:
            return
        settings = dict(
            w_fmt=self.w_fmt,
            a_fmt=self.a_fmt,
            g_fmt=self.g_fmt,
            include=self.include,
            exclude=self.exclude,
            quantize_backward=self.quantize_backward,
            rounding=self.rounding,
            backend=self.backend,
            grad_rounding=self.grad_rounding,
            scale_rule=self.scale_rule,
        )
        conv1ds = quantize_conv1ds(module, **settings)
        try:
            quantize_linears(module, **settings)
        except ValueError:
            if not conv1ds:  # no layer at all is selected
                raise
        keep_quantized_paths(module)
        warn_unquantized(module, self.include, self.exclude)

    def main_params(self, optimizer: Optimizer) -> list[Tensor]:
        """What gradient clipping sees: every parameter but the learnable multipliers.

        Lightning clips exactly these, in the Trainer (``gradient_clip_val``) and in
        ``fabric.clip_gradients``. The multipliers paper (arXiv 2601.04890) takes the global
        norm without the multipliers' gradients and leaves them unclipped: counted in, they
        over-clip everything else and erase the multipliers' gain.
        """
        return without_multipliers(super().main_params(optimizer))

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """A forward's dtype context; an exception inside restores the point estimate.

        Whether the forward runs at a sample was decided by the module (Fabric: its forward
        pre-hook; Trainer: the step context); if it raises, the backward that would restore
        the point estimate never comes. Under FSDP2 the sampler's forward hook is moved in
        front of ``fully_shard``'s all-gather first (:meth:`PosteriorSampler.hooks_first`).
        """
        self._sampler.hooks_first()
        with self._sampler.restoring_on_error(), self._dtype_context():
            yield

    def _dtype_context(self) -> AbstractContextManager:
        """The forward's dtype: bf16 autocast with ``autocast="bf16"``, bf16 as the default
        dtype with ``param_dtype="bf16"`` (as Lightning's ``bf16-true``), else nothing.

        The autocast device is ``device`` if given, else that of the model's parameters when
        the forward starts (after Lightning moved them), so ``accelerator="cpu"`` on a GPU
        machine autocasts on the CPU. The autocast weight cache is off (as in the Trainer's
        own mixed precision): weights may change in place between forwards in one context.
        """
        if self.param_dtype is not None:
            return self.tensor_init_context()
        if self.autocast is None:
            return nullcontext()
        device = self.device or self._sampler.device_type() or "cpu"
        return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)

    def tensor_init_context(self) -> AbstractContextManager:
        """With ``param_dtype``, new floating tensors default to it (``init_module()`` too)."""
        if self.param_dtype is None:
            return nullcontext()
        return _DtypeContextManager(torch.bfloat16)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def backward(self, tensor: Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """``fabric.backward``; a backward that raises still leaves the point estimate."""
        with self._sampler.restoring_on_error():
            super().backward(tensor, model, *args, **kwargs)

    def post_backward(self, tensor: Tensor, module: nn.Module | None) -> Any:
        """The gradient at the sample is taken: the parameters return to the point estimate."""
        self._sampler.restore()
        return super().post_backward(tensor, module)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """``optimizer.step()``; a posterior optimizer's closure runs here, not in its step.

        The closure then goes through this plugin's forward and backward, so whether it runs
        at a sample is this plugin's decision (``sample``), not the optimizer's.
        """
        if not is_posterior(optimizer):
            return super().optimizer_step(optimizer, **kwargs)
        closure: Callable[[], Any] | None = kwargs.pop("closure", None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        optimizer.step(**kwargs)
        return loss

    def teardown(self) -> None:
        """Leave the point estimate in the parameters, also after an exception."""
        self._sampler.restore()
        super().teardown()

    def convert_input(self, data: Any) -> Any:
        """Floating inputs to bf16 under ``autocast`` or ``param_dtype``, else unchanged."""
        if self.autocast is None and self.param_dtype is None:
            return data
        return apply_to_collection(
            data, function=_convert_fp_tensor, dtype=Tensor, dst_type=torch.bfloat16
        )

    def convert_output(self, data: Any) -> Any:
        """Floating outputs back to the default dtype (fp32) when inputs were converted."""
        if self.autocast is None and self.param_dtype is None:
            return data
        return apply_to_collection(
            data, function=_convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype()
        )

    def state_dict(self) -> dict[str, Any]:
        """The settings, as plain Python values (checkpoints load with ``weights_only=True``)."""
        return {
            "fmt_map": None if self.fmt_map is None else {
                pattern: None if f is None else f.name for pattern, f in self.fmt_map.items()
            },
            "w_fmt": None if self.w_fmt is None else self.w_fmt.name,
            "a_fmt": None if self.a_fmt is None else self.a_fmt.name,
            "g_fmt": None if self.g_fmt is None else self.g_fmt.name,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            "quantize_backward": self.quantize_backward,
            "rounding": self.rounding,
            "grad_rounding": self.grad_rounding,
            "scale_rule": self.scale_rule,
            "backend": self.backend,
            "autocast": self.autocast,
            "param_dtype": self.param_dtype,
            "sample": self.sample,
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
        if self.fmt_map is not None:
            args = [repr(self.state_dict()["fmt_map"])]
        elif len(set(formats.values())) == 1:
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


class LowPrecisionPlugin(Precision, LowPrecision):
    """Trainer precision plugin: emulated MX/FP8 matmuls in the selected Linear layers.

    ``Trainer(plugins=[LowPrecisionPlugin("mxfp6_e2m3")])``. The same plugin as
    :class:`LowPrecision` (see there for the trade-off, the autocast note, strategies and
    checkpoints), in the Trainer's shape, as Lightning's own twins
    (``TransformerEnginePrecision``, ``BitsandbytesPrecision``): the Trainer's hooks come from
    Lightning's ``Precision``, conversion, dtype contexts and settings from ``LowPrecision``.
    For Fabric pass :class:`LowPrecision`; this class refuses a module without a Trainer.

    Use ``LowPrecisionPlugin(..., autocast="bf16")`` instead of ``precision="bf16-mixed"``,
    which Lightning refuses next to any precision plugin.

    Posterior sampling (see :class:`LowPrecision`) follows the Trainer's own step structure:
    the posterior optimizers are those of ``configure_optimizers``; ``training_step`` draws the
    sample, the backward (automatic optimisation) or the end of ``training_step`` (manual)
    restores the point estimate, and evaluation steps and checkpoints see the point estimate.
    An exception anywhere in between (``training_step``, ``on_before_backward``, the backward,
    ``detect_anomaly``, Ctrl-C) restores it before Lightning's exception handling runs, so
    ``OnExceptionCheckpoint`` saves the point estimate and the error stays the user's.

    ``configure_model``: Lightning calls it before it converts the module, so layers built
    there are quantized like any other.

    Args:
        fmt: the format of every quantized operand, e.g. ``"mxfp6_e2m3"`` (the names are in
            :data:`lightning_lowprec.FORMATS`); ``None`` with no per-operand format quantizes
            nothing: the plugin then only does posterior sampling.
        w_fmt: the weights' format, overriding ``fmt``.
        a_fmt: the input activations' format, overriding ``fmt``.
        g_fmt: the output gradients' format, overriding ``fmt``; only with
            ``quantize_backward=True``.
        include: module-name patterns of the Linear layers to quantize (``None``: all).
        exclude: module-name patterns left in full precision; default: the LM head
            (``lm_head``). Names are those of the LightningModule (e.g. ``gpt.lm_head``); the
            pattern rule is that of :func:`~lightning_lowprec.nn.quantize_linears`.
        quantize_backward: also quantize the two backward matmuls (default: straight-through,
            backward in the working dtype, as the LMD paper).
        rounding: ``"even"`` (the MX spec's round-to-nearest-even), ``"nearest"`` or
            ``"stochastic"``: of the forward operands (and of the gradient unless
            ``grad_rounding`` is given).
        grad_rounding: the output gradients' rounding, ``None`` (default: ``rounding``) or a
            mode; only with ``quantize_backward=True``. ``rounding="even",
            grad_rounding="stochastic"`` is the common MX recipe (unbiased gradients).
        scale_rule: the MX block scales, ``"floor"`` (the OCP spec's, default) or ``"rceil"``
            (NVIDIA's and torchao's MXFP8 rule); see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        backend: ``"auto"`` (default: real FP8 matmuls where the GPU has them for the
            format, else emulated), ``"emulated"`` or ``"scaled_mm"``; see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        autocast: ``None`` (the working dtype is the parameters') or ``"bf16"`` (as
            ``precision="bf16-mixed"``).
        device: device type of the autocast (``"cuda"``, ``"cpu"``, ...); default: that of the
            model's parameters. Only used with ``autocast``.
        sample: with a posterior optimizer, train at samples (``True``, the method) or at the
            point estimate (``False``: the optimizer's deterministic dynamics, the paper's
            ablation). No effect on plain optimizers.
        param_dtype: ``None`` (parameters as the model made them) or ``"bf16"`` (as
            ``precision="bf16-true"``: parameters stored and run in bf16, floating batches
            cast to bf16). Not combined with ``autocast``.

    Raises:
        ValueError: an unknown format, rounding (or grad_rounding without
            ``quantize_backward=True``), scale rule, autocast mode or param_dtype, ``autocast``
            with ``param_dtype``, a format missing for one operand, or
            ``include``/``quantize_backward`` without a format; at setup, a model with no
            Linear layer selected, or use outside a Trainer (e.g. ``L.Fabric(plugins=...)``).
    """

    # Set by connect() and around training_step: manual optimisation restores at its end.
    _automatic = True
    _in_training_step = False
    # Set by connect(): the FSDP2 modules of the LightningModule, resharded at each step.
    _sharded: tuple[weakref.ref, ...] = ()

    def convert_module(self, module: nn.Module) -> nn.Module:
        """As :meth:`LowPrecision.convert_module`, for the Trainer's LightningModule.

        Raises:
            ValueError: ``module`` is not a LightningModule attached to a Trainer (this
                plugin was given to ``L.Fabric``, whose plugin is :class:`LowPrecision`).
        """
        if not isinstance(module, pl.LightningModule) or module._trainer is None:
            raise ValueError(
                f"{type(self).__name__} is the Trainer's plugin (L.Trainer(plugins=[...])); it "
                f"was asked to set up a {type(module).__name__} outside a Trainer. With Fabric "
                f"use LowPrecision: L.Fabric(plugins=[LowPrecision(...)])."
            )
        self._convert(module)
        # The Trainer's step contexts, not each forward, decide about sampling.
        self._sampler.attach(module, per_forward=False)
        return module

    def convert_input(self, data: Any) -> Any:
        """The Trainer's bf16-mixed leaves batches as they are, its bf16-true casts floating
        ones to bf16; so does this plugin."""
        return data if self.param_dtype is None else super().convert_input(data)

    def connect(
        self, model: nn.Module, optimizers: list[Any], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Any], list[Any]]:
        """The optimizers of ``configure_optimizers`` own their parameters (``model`` may be
        DDP-wrapped)."""
        self._sampler.claim(optimizers)
        module = next(m for m in model.modules() if isinstance(m, pl.LightningModule))
        self._automatic = module.automatic_optimization
        # ModelParallelStrategy connects after configure_model's fully_shard, and after its
        # model.to(device), which drops the multipliers' marks from their DTensor parameters
        # (clipping and the monitor leave out the marked ones).
        self._sharded = tuple(weakref.ref(m) for m in fsdp_modules(module))
        if self._sharded:
            mark_sharded_multipliers(module)
        return super().connect(model, optimizers, lr_schedulers)

    def _reshard(self) -> None:
        """FSDP2: put the parameters back into their shards before a step writes them.

        After a forward with no backward (a validation step, the sanity check, a
        ``training_step`` that returned ``None``) FSDP2 keeps the root module's parameters
        gathered and the next forward skips the all-gather: a sample (or the point estimate)
        written into the shards would never reach it. The Fabric plugin does this in its
        per-forward hook (:class:`~lightning_lowprec.sampling.PosteriorSampler`).
        """
        for ref in self._sharded:
            module = ref()
            if module is not None:
                module.reshard()

    @contextmanager
    def train_step_context(self) -> Iterator[None]:
        """``training_step`` runs at this step's sample.

        Automatic optimisation: the backward comes after ``training_step`` returns and needs
        the sample (autograd saved the sampled weights), so ``post_backward`` restores.
        Manual optimisation: the backward is inside, so the point estimate is restored here.
        """
        self._reshard()
        self._sampler.draw()
        self._in_training_step = True
        try:
            with self.forward_context():
                yield
        finally:
            self._in_training_step = False
        if not self._automatic:
            self._sampler.restore()

    @contextmanager
    def val_step_context(self) -> Iterator[None]:
        """Evaluation runs at the point estimate.

        It is already in place unless a ``training_step`` returned ``None`` (no backward to
        restore after) in the middle of gradient accumulation; under FSDP2 that forward left
        its sample gathered, so the gathered copy is dropped and the forward gathers the point
        estimate from the shards. Otherwise the gathered copy is kept: it is the point
        estimate, and the later evaluation steps skip the root's all-gather.
        """
        if self._sampler.held():
            self._reshard()
        self._sampler.restore()
        with self._dtype_context():
            yield

    test_step_context = val_step_context
    predict_step_context = val_step_context

    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        """``on_before_backward``; if it raises, the point estimate is restored."""
        with self._sampler.restoring_on_error():
            return super().pre_backward(tensor, module)

    def backward(  # type: ignore[override]
        self, tensor: Tensor, model: pl.LightningModule, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        """The backward at the sample; if it raises, the point estimate is restored."""
        with self._sampler.restoring_on_error():
            super().backward(tensor, model, optimizer, *args, **kwargs)

    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        """Automatic optimisation: the gradient at the sample is taken, restore the point
        estimate before ``on_after_backward`` (manual: ``training_step`` may go on sampled)."""
        if module.automatic_optimization:
            self._sampler.restore()
        return super().post_backward(tensor, module)

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        """Run the closure (training step, backward, ``on_before_optimizer_step``, clipping),
        then a posterior optimizer's ``step()`` without it, so that this plugin, not the
        optimizer, decides whether the closure runs at a sample (``sample``).

        In manual optimisation ``training_step`` goes on after ``opt.step()``: the next step's
        sample is drawn, so a further forward in it is sampled too.
        """
        if not is_posterior(optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        with self._sampler.restoring_on_error():
            result = self._wrap_closure(model, optimizer, closure)
        optimizer.step(**kwargs)
        if self._in_training_step and self.sample:
            optimizer.sample_()
        return result

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume exactly from a checkpoint that ``MergeMultipliers`` merged, also when the
        resuming Trainer has no ``MergeMultipliers``.

        Lightning has loaded the merged weights into the model by now (multipliers at 1:
        the same function, but not the raw weights the optimizer state describes; LMD's
        next step would write its raw point estimate under multipliers of 1). So the
        checkpoint is un-merged and the model loaded again, before the optimizer state.
        """
        if FACTORS_KEY not in checkpoint:
            return
        unmerge_checkpoint(checkpoint)
        for module in self._sampler.attached():
            module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
        rank_zero_warn(
            "The checkpoint holds merged multipliers (saved with MergeMultipliers) and this "
            "Trainer has no MergeMultipliers callback; the plugin un-merged it, so training "
            "resumes exactly. Add MergeMultipliers() to keep the checkpoints it writes merged."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to finish a checkpoint saved from inside ``training_step`` at a sample.

        Its weights are the point estimate (the sampler's ``state_dict`` guard), but the run
        is in the middle of a step; elsewhere (an exception, a callback) saving is fine.

        Raises:
            RuntimeError: a posterior optimizer holds a sample inside ``training_step``.
        """
        held = [type(o).__name__ for o in self._sampler.held()] if self._in_training_step else []
        if held:
            raise RuntimeError(
                f"A checkpoint is being saved while the parameters hold a posterior sample of "
                f"{', '.join(held)}, not the point estimate. Save between optimizer steps (e.g. "
                "from a callback's on_train_batch_end or ModelCheckpoint), not from inside "
                "training_step."
            )


refuse_fsdp1((LowPrecision,))
