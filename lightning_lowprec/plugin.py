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
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowprec.formats import Format
from lightning_lowprec.nn import (
    DEFAULT_EXCLUDE,
    FormatMap,
    _check_mapping_alone,
    _check_patterns,
    _check_rounding,
    _resolve_formats,
    check_format_map,
    quantize_linears,
)
from lightning_lowprec.optim.groups import is_multiplier
from lightning_lowprec.posterior import PosteriorOptimizer, is_posterior, tracked
from lightning_lowprec.quantize import Rounding

__all__ = ["LowPrecision", "LowPrecisionPlugin"]

AUTOCAST_MODES: tuple[str, ...] = ("bf16",)
PARAM_DTYPES: tuple[str, ...] = ("bf16",)
_REPR_DEFAULTS = {
    "include": None,
    "quantize_backward": False,
    "rounding": "even",
    "autocast": None,
    "param_dtype": None,
    "sample": True,
}
_LINKS = ("_set_up", "_connected", "_lightning_module", "_in_training_step")
"""The plugin's runtime links to a model and its optimizers (see ``LowPrecision._unlink``)."""


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
    does, and the quantized operands are bf16. For ``precision="bf16-true"`` (parameters
    stored in bf16, half the memory, no fp32 copy anywhere) pass ``param_dtype="bf16"``.

    Strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...). FSDP and DeepSpeed
    accept only their own precision plugins; Lightning raises a ``TypeError`` ("The FSDP
    strategy can only work with the FSDPPrecision plugin, found LowPrecision(...)") — use DDP.

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

    * Fabric: a *training forward* is a forward through the set-up model with gradients enabled
      while it is in training mode; it draws the sample, and ``fabric.backward(loss)``
      (mandatory with this plugin) restores the point estimate. Any other forward (``eval()``
      or ``torch.no_grad()``) runs at the point estimate. ``optimizer.step()`` needs nothing
      extra; with gradient accumulation every micro-batch's forward redraws the same sample.
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
        param_dtype: ``None`` (parameters as the model made them) or ``"bf16"``: Lightning's
            ``"bf16-true"``. ``setup`` converts the model to bf16, ``init_module()`` creates
            bf16 tensors, forwards run with bf16 as the default dtype, floating inputs are cast
            to bf16 and outputs back to fp32. The optimizers here keep fp32 state beside bf16
            weights (M+Adam with ``storage=None`` rounds its update into them: no fp32
            master). Not combined with ``autocast``.
        device: device type of the autocast (``"cuda"``, ``"cpu"``, ...); default ``"cuda"`` if
            CUDA is available, else ``"cpu"``. Only used with ``autocast``.
        sample: with a posterior optimizer, train at samples (``True``, the method) or at the
            point estimate (``False``: the optimizer's deterministic dynamics, the paper's
            ablation). No effect on plain optimizers.

    Raises:
        ValueError: an unknown format, rounding, autocast mode or param_dtype, ``autocast``
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
        autocast: Literal["bf16"] | None = None,
        device: str | None = None,
        sample: bool = True,
        param_dtype: Literal["bf16"] | None = None,
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
        self.sample = sample
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
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if autocast is None:
            # What MixedPrecision/HalfPrecision.__init__ set (Lightning reads these).
            self.precision = "32-true" if param_dtype is None else "bf16-true"
            self.device, self.scaler = device, None
            self._desired_input_dtype = torch.float32 if param_dtype is None else torch.bfloat16
        else:
            FabricMixedPrecision.__init__(self, "bf16-mixed", device)
        self._unlink()

    def _unlink(self) -> None:
        """Forget the runtime links to models and optimizers (set up again in each process)."""
        # The modules given to setup: Fabric's plugin samples for a forward of a training one.
        self._set_up: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # The Trainer's posterior optimizers, from connect(), and whether training_step runs.
        self._connected: list[PosteriorOptimizer] = []
        self._lightning_module: pl.LightningModule | None = None
        self._in_training_step = False

    def __getstate__(self) -> dict[str, Any]:
        """The settings only: ``ddp_spawn`` pickles the plugin into workers that set up their
        own model and optimizers (and a ``WeakSet`` cannot be pickled)."""
        return {key: value for key, value in self.__dict__.items() if key not in _LINKS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._unlink()

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Re-class the selected Linear layers of ``module`` in place; return ``module``.

        With ``fmt=None`` nothing is re-classed. Either way the module is remembered (weakly):
        Fabric's plugin samples for the training forwards of the modules it set up. With
        ``param_dtype`` the module is first converted to it.
        """
        if self.param_dtype is not None:
            module.to(dtype=self._desired_input_dtype)
        if self.w_fmt is not None or self.fmt_map is not None:
            quantize_linears(
                module,
                self.fmt_map,  # None: the per-operand formats below
                w_fmt=self.w_fmt,
                a_fmt=self.a_fmt,
                g_fmt=self.g_fmt,
                include=self.include,
                exclude=self.exclude,
                quantize_backward=self.quantize_backward,
                rounding=self.rounding,
            )
        self._set_up.add(module)
        return module

    def main_params(self, optimizer: Optimizer) -> list[Tensor]:
        """What gradient clipping sees: every parameter but the learnable multipliers.

        Lightning clips exactly these, in the Trainer (``gradient_clip_val``) and in
        ``fabric.clip_gradients``. The multipliers paper (arXiv 2601.04890) takes the global
        norm without the multipliers' gradients and leaves them unclipped: counted in, they
        over-clip everything else and erase the multipliers' gain.
        """
        return [p for p in super().main_params(optimizer) if not is_multiplier(p)]

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """Fabric's forward: at this step's sample if it is a training forward, then autocast.

        A training forward (gradients enabled, a set-up module in training mode) draws the
        sample (idempotent within a step); its backward restores the point estimate. Any other
        forward restores it first, should a training forward have gone without a backward.
        If the forward raises, its backward never comes: the point estimate is restored here.
        """
        training = torch.is_grad_enabled() and any(m.training for m in self._set_up)
        if training:
            self._sample_posteriors()
        else:
            self._restore_posteriors()
        with self._step_context():
            yield

    @contextmanager
    def _step_context(self) -> Iterator[None]:
        """The forward's dtype context (:meth:`_dtype_context`); an exception inside means no
        backward will restore the point estimate, so it is restored here before it goes on."""
        try:
            with self._dtype_context():
                yield
        except BaseException:
            self._restore_posteriors()
            raise

    def _dtype_context(self) -> AbstractContextManager:
        """The forward's dtype: bf16 autocast with ``autocast="bf16"``, bf16 as the default
        dtype with ``param_dtype="bf16"`` (as Lightning's ``bf16-true``), else nothing.

        The autocast weight cache is off (as in the Trainer's own mixed precision): weights
        may change in place between forwards inside one context.
        """
        if self.param_dtype is not None:
            return self.tensor_init_context()
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False)

    def tensor_init_context(self) -> AbstractContextManager:
        """With ``param_dtype``, new floating tensors default to it (``init_module()`` too)."""
        if self.param_dtype is None:
            return nullcontext()
        return _DtypeContextManager(self._desired_input_dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    def backward(self, tensor: Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """``fabric.backward``; a backward that raises still leaves the point estimate."""
        try:
            super().backward(tensor, model, *args, **kwargs)
        except BaseException:
            self._restore_posteriors()
            raise

    def post_backward(self, tensor: Tensor, module: nn.Module | None) -> None:
        """The gradient at the sample is taken: the parameters return to the point estimate."""
        self._restore_posteriors()

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
        self._restore_posteriors()
        super().teardown()

    def _posterior_optimizers(self) -> list[PosteriorOptimizer]:
        """The posterior optimizers of the set-up modules (Fabric: tracked ones holding any of
        their parameters).

        Raises:
            RuntimeError: two of them hold the same parameter (one is a leftover: each would
                overwrite the other's sample).
        """
        candidates = tracked()
        if not candidates:
            return []
        params = {p for module in self._set_up for p in module.parameters()}
        found = [opt for opt in candidates if any(p in params for p in _params_of(opt))]
        seen: set[Tensor] = set()
        for opt in found:
            own = set(_params_of(opt))
            if own & seen:
                names = ", ".join(type(o).__name__ for o in found)
                raise RuntimeError(
                    f"{len(found)} posterior optimizers ({names}) hold parameters of the same "
                    "model, so the plugin cannot tell which one samples them. Delete the one "
                    "you no longer use (`del optimizer`)."
                )
            seen |= own
        return found

    def _sample_posteriors(self) -> None:
        """Write this step's sample of every posterior optimizer (unless ``sample=False``)."""
        if self.sample:
            for optimizer in self._posterior_optimizers():
                optimizer.sample_()

    def _restore_posteriors(self) -> None:
        """Write every posterior optimizer's point estimate back (no-op where none is held)."""
        for optimizer in self._posterior_optimizers():
            optimizer.restore_()

    def convert_input(self, data: Any) -> Any:
        """Floating inputs to bf16 under ``autocast`` or ``param_dtype``, else unchanged."""
        if self.autocast is None and self.param_dtype is None:
            return data
        return super().convert_input(data)

    def convert_output(self, data: Any) -> Any:
        """Floating outputs back to the default dtype (fp32) when inputs were converted."""
        if self.autocast is None and self.param_dtype is None:
            return data
        return super().convert_output(data)

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


class LowPrecisionPlugin(MixedPrecision, LowPrecision):
    """Trainer precision plugin: emulated MX/FP8 matmuls in the selected Linear layers.

    ``Trainer(plugins=[LowPrecisionPlugin("mxfp6_e2m3")])``. The same plugin as
    :class:`LowPrecision` (see there for every argument, the autocast note, strategies and
    checkpoints); this class adds the Trainer's hooks (``on_before_backward``, gradient
    clipping, the closure) and routes the shared methods to the shared implementation.

    Use ``LowPrecisionPlugin(..., autocast="bf16")`` instead of ``precision="bf16-mixed"``,
    which Lightning refuses next to any precision plugin.

    Posterior sampling (see :class:`LowPrecision`) follows the Trainer's own step structure:
    the posterior optimizers are those of ``configure_optimizers``; ``training_step`` draws the
    sample, the backward (automatic optimisation) or the end of ``training_step`` (manual)
    restores the point estimate, and evaluation steps and checkpoints see the point estimate.
    """

    __init__ = LowPrecision.__init__
    # The Trainer's step contexts below decide about sampling; forwards only need autocast.
    forward_context = LowPrecision._dtype_context
    state_dict = LowPrecision.state_dict
    load_state_dict = LowPrecision.load_state_dict
    # Without a gradient scaler there is nothing to unscale, so fused optimizers may clip.
    clip_gradients = Precision.clip_gradients

    def convert_input(self, data: Any) -> Any:
        """The Trainer's bf16-mixed leaves batches as they are, its bf16-true casts floating
        ones to bf16; so does this plugin."""
        return data if self.param_dtype is None else LowPrecision.convert_input(self, data)

    def connect(
        self, model: nn.Module, optimizers: list[Any], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Any], list[Any]]:
        """Remember the posterior optimizers and the LightningModule (``model`` may be DDP)."""
        self._connected = [o for o in map(_unwrap, optimizers) if is_posterior(o)]
        self._lightning_module = next(
            m for m in model.modules() if isinstance(m, pl.LightningModule)
        )
        return super().connect(model, optimizers, lr_schedulers)

    @contextmanager
    def train_step_context(self) -> Iterator[None]:
        """``training_step`` runs at this step's sample.

        Automatic optimisation: the backward comes after ``training_step`` returns and needs
        the sample (autograd saved the sampled weights), so ``post_backward`` restores.
        Manual optimisation: the backward is inside, so the point estimate is restored here.
        """
        self._sample_posteriors()
        self._in_training_step = True
        try:
            with self._step_context():
                yield
        finally:
            self._in_training_step = False
        if not self._automatic():
            self._restore_posteriors()

    @contextmanager
    def val_step_context(self) -> Iterator[None]:
        """Evaluation runs at the point estimate.

        It is already in place unless a ``training_step`` returned ``None`` (no backward to
        restore after) in the middle of gradient accumulation.
        """
        self._restore_posteriors()
        with self._dtype_context():
            yield

    test_step_context = val_step_context
    predict_step_context = val_step_context

    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:
        """Automatic optimisation: the gradient at the sample is taken, restore the point
        estimate before ``on_after_backward`` (manual: ``training_step`` may go on sampled)."""
        if module.automatic_optimization:
            self._restore_posteriors()
        return super().post_backward(tensor, module)

    def optimizer_step(
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
        result = self._wrap_closure(model, optimizer, closure)
        optimizer.step(**kwargs)
        if self._in_training_step and self.sample:
            optimizer.sample_()
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to finish a checkpoint whose weights are a sample.

        Raises:
            RuntimeError: a posterior optimizer holds a sample, i.e. the checkpoint is saved
                from inside ``training_step`` or between a forward and its backward.
        """
        held = [type(o).__name__ for o in self._posterior_optimizers() if o.holds_sample]
        if held:
            raise RuntimeError(
                f"A checkpoint is being saved while the parameters hold a posterior sample of "
                f"{', '.join(held)}, not the point estimate. Save between optimizer steps (e.g. "
                "from a callback's on_train_batch_end or ModelCheckpoint), not from inside "
                "training_step."
            )

    def _automatic(self) -> bool:
        module = self._lightning_module
        return module is None or module.automatic_optimization

    def _posterior_optimizers(self) -> list[PosteriorOptimizer]:
        """The posterior optimizers of ``configure_optimizers`` (from :meth:`connect`)."""
        return self._connected


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside a Lightning/Fabric wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _params_of(optimizer: Any) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
