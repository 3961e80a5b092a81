"""The ``lowprec:`` section of a ``lowprec-litgpt`` recipe: what this package adds to a run.

A recipe is a LitGPT YAML file plus one extra top-level key::

    lowprec:
      fmt: mxfp6_e2m3                 # forward matmul format; null: no quantization;
                                      # or per layer: {"attn.qkv": mxfp8_e4m3, "*": mxfp4_e2m1}
      optimizer:                      # replaces litgpt's --optimizer, built from named groups
        class_path: lightning_lowprec.LMD
        init_args: {lr: 0.01, sigma: 0.05, weight_decay: 0.1}
      sample: true                    # posterior sampling (posterior optimizers only)
      multipliers: paper              # learnable multipliers placement; null: none
      max_norm: 1.0                   # clip gradients (multipliers left out); fine-tuning too
      monitor: {every_n_steps: 10}    # NormMonitor settings; null: off
      strategy: fsdp2                 # with --devices N > 1: fsdp2 or ddp

On the command line every key can be overridden as ``--lowprec.KEY VALUE``, nested keys too
(``--lowprec.optimizer.init_args.lr 0.01``). Files and values are read as jsonargparse reads
litgpt's own (``lr: 2e-5`` is a number, ``--lowprec.fmt null`` is ``None``), and several files
and overrides merge key by key, the later winning (:func:`merge_section`). Everything else on
the command line and in the file is litgpt's own and goes to litgpt unchanged.

Validation happens here, before litgpt starts: an unknown key, format, placement or optimizer
class, and a value the optimizer or the parameter groups reject (the optimizer is built once on
a dummy tensor), fail with a message naming the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_lowprec.formats import FORMATS
from lightning_lowprec.multipliers import PLACEMENTS
from lightning_lowprec.nn import DEFAULT_EXCLUDE, check_format_map
from lightning_lowprec.quantizer import ROUNDING_MODES, SCALE_RULES
from lightning_lowprec.scaled_mm import BACKENDS

__all__ = [
    "SECTION", "LowPrecOptions", "build_optimizer", "load_yaml", "merge_section", "resume_changes",
]

SECTION = "lowprec"
"""The top-level key of a recipe that holds :class:`LowPrecOptions`."""

GROUP_KEYS: tuple[str, ...] = (
    "embedding_weight_decay", "multiplier_weight_decay", "multiplier_lr_ratio", "adamw",
)
"""Keys of ``param_groups`` (passed to :func:`lightning_lowprec.optim.param_groups`)."""
MONITOR_KEYS: tuple[str, ...] = ("every_n_steps", "histograms", "update_ratio", "bound_margin")
"""Keys of ``monitor`` (the arguments of :class:`~lightning_lowprec.callbacks.NormMonitor`)."""
STRATEGIES: tuple[str, ...] = ("fsdp2", "ddp")
"""Values of ``strategy``: how a run on several devices is distributed."""
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda", "gpu", "mps")
"""Values of ``accelerator`` (Lightning's names)."""


@dataclass(frozen=True)
class LowPrecOptions:
    """The ``lowprec:`` section, validated.

    Attributes:
        fmt: format of the quantized forward matmuls (a name from
            :data:`lightning_lowprec.FORMATS`), a per-layer mapping ``{pattern: format}``
            (:data:`lightning_lowprec.nn.FormatMap`, e.g. from ``recommend_formats``), or
            ``None`` for none. With ``finetune_lora`` only the frozen base layers are quantized
            (the ``nn.Linear`` inside litgpt's LoRA layers); the adapters' ``x @ A^T @ B^T``
            runs at the run's precision.
        include: module-name patterns of the Linear layers to quantize (``None``: all).
        exclude: module-name patterns kept in full precision (default: the LM head).
        rounding: ``"even"``, ``"nearest"`` or ``"stochastic"``.
        grad_rounding: the output gradients' rounding (``null``: ``rounding``); only with
            ``quantize_backward``, e.g. ``even`` operands with ``stochastic`` gradients.
        scale_rule: the MX block scales, ``"floor"`` (the OCP spec's) or ``"rceil"``
            (NVIDIA's and torchao's MXFP8 rule); see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        quantize_backward: quantize the backward matmuls too.
        backend: ``"auto"`` (real FP8 matmuls where the GPU has them for ``fmt``, else
            emulated), ``"emulated"`` or ``"scaled_mm"``; see
            :class:`~lightning_lowprec.nn.QuantizedLinear`.
        optimizer: ``{"class_path": ..., "init_args": {...}}``; when given, it becomes
            litgpt's ``--optimizer`` (what litgpt prints and saves; a different
            ``--optimizer`` is refused) and is built on
            :func:`~lightning_lowprec.optim.param_groups` (norms and biases without weight
            decay, multipliers with their own). ``None``: litgpt's optimizer, built by litgpt
            on the flat parameter list.
        param_groups: extra arguments of ``param_groups`` (keys :data:`GROUP_KEYS`); needs
            ``optimizer`` (litgpt builds its own on one flat parameter list).
        sample: with a posterior optimizer (LMD), train at posterior samples (the method) or
            at the point estimate.
        multipliers: learnable-multiplier placement (a name from
            :data:`lightning_lowprec.multipliers.PLACEMENTS`) or ``None``.
        max_norm: clip the global gradient norm to this value before every optimizer step,
            multipliers left out; ``None``: no clipping by the runner (``pretrain`` clips by
            itself with ``--train.max_norm``, also without the multipliers).
        monitor: NormMonitor arguments (keys :data:`MONITOR_KEYS`), or ``None`` for no monitor.
        compile: let ``pretrain`` wrap the model in ``torch.compile``: ``"auto"`` only on CUDA
            (on CPU compiling a GPT takes minutes, longer than the runs it would speed up),
            ``True`` or ``False``.
        progress_bar: show a progress bar of the optimizer steps.
        strategy: how a run on several devices (``--devices N``, ``--num_nodes``) is
            distributed (:data:`STRATEGIES`): ``"fsdp2"`` shards parameters, gradients and
            optimizer state over the devices (Lightning's ``ModelParallelStrategy`` with one
            ``fully_shard`` per transformer block, see :mod:`lightning_lowprec.fsdp`), in place
            of litgpt's ``FSDPStrategy`` (FSDP1, which takes no other precision plugin);
            ``"ddp"`` replicates them. Unused on one device.
        accelerator: the device type (:data:`ACCELERATORS`; ``--accelerator`` on the command
            line is the same key). litgpt has no such argument and always lets Lightning
            choose (``"auto"``); ``"cpu"`` runs ``--devices N`` as N CPU processes (gloo).
    """

    fmt: str | dict[str, str | None] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    rounding: str = "even"
    grad_rounding: str | None = None
    scale_rule: str = "floor"
    quantize_backward: bool = False
    backend: str = "auto"
    optimizer: dict[str, Any] | None = None
    param_groups: dict[str, Any] = field(default_factory=dict)
    sample: bool = True
    multipliers: str | None = None
    max_norm: float | None = None
    monitor: dict[str, Any] | None = field(default_factory=dict)
    compile: bool | str = "auto"
    progress_bar: bool = True
    strategy: str = "fsdp2"
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.fmt, Mapping):
            check_format_map(self.fmt)
        elif self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(_choices("fmt", self.fmt, [None, *FORMATS]))
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(_choices("rounding", self.rounding, ROUNDING_MODES))
        if self.grad_rounding is not None and self.grad_rounding not in ROUNDING_MODES:
            raise ValueError(
                _choices("grad_rounding", self.grad_rounding, [None, *ROUNDING_MODES])
            )
        if self.grad_rounding is not None and self.quantize_backward is not True:
            raise ValueError(
                f"lowprec.grad_rounding: {self.grad_rounding!r} rounds the quantized gradient; "
                "it needs lowprec.quantize_backward: true."
            )
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(_choices("scale_rule", self.scale_rule, SCALE_RULES))
        if self.backend not in BACKENDS:
            raise ValueError(_choices("backend", self.backend, BACKENDS))
        if self.multipliers is not None and self.multipliers not in PLACEMENTS:
            raise ValueError(_choices("multipliers", self.multipliers, [None, *PLACEMENTS]))
        if self.strategy not in STRATEGIES:
            raise ValueError(_choices("strategy", self.strategy, STRATEGIES))
        if self.accelerator not in ACCELERATORS:
            raise ValueError(_choices("accelerator", self.accelerator, ACCELERATORS))
        if self.compile not in (True, False, "auto"):
            raise ValueError(_choices("compile", self.compile, ["auto", True, False]))
        for name in ("quantize_backward", "sample", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(_choices(name, getattr(self, name), [True, False]))
        if self.max_norm is not None and not (
            isinstance(self.max_norm, (int, float)) and self.max_norm > 0
        ):
            raise ValueError(
                f"lowprec.max_norm must be a number > 0 or null, got {self.max_norm!r}."
            )
        _check_keys("param_groups", self.param_groups, GROUP_KEYS)
        if self.param_groups and self.optimizer is None:
            raise ValueError(
                f"lowprec.param_groups {dict(self.param_groups)!r} needs lowprec.optimizer: "
                "without it litgpt builds its --optimizer on one flat parameter list, so the "
                "groups would not apply. Set lowprec.optimizer, or remove lowprec.param_groups."
            )
        if self.monitor is not None:
            _check_keys("monitor", self.monitor, MONITOR_KEYS)
            _check_monitor(self.monitor)
        if self.optimizer is not None:
            _check_optimizer(self.optimizer, self.param_groups)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> LowPrecOptions:
        """Build from a parsed ``lowprec:`` mapping; ``None`` or ``{}`` gives the defaults."""
        section = dict(section or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown key(s) in the lowprec section: {', '.join(unknown)}. "
                f"Valid keys: {', '.join(valid)}."
            )
        for name in ("include", "exclude"):
            if name in section and section[name] is not None:
                value = section[name]
                section[name] = (value,) if isinstance(value, str) else tuple(value)
        if section.get("exclude", ()) is None:
            section["exclude"] = ()
        if "param_groups" in section and section["param_groups"] is None:
            section["param_groups"] = {}
        return cls(**section)

    def as_mapping(self) -> dict[str, Any]:
        """The section as plain YAML-friendly values (what ``lowprec.yaml`` records)."""
        out = dataclasses.asdict(self)
        for name in ("include", "exclude"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out


def load_yaml(text: str) -> Any:
    """``text`` parsed as jsonargparse parses litgpt's files and values (``2e-5`` is a float,
    which PyYAML's YAML 1.1 rules would leave a string)."""
    from jsonargparse import get_loader

    return get_loader("yaml")(text)


def merge_section(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override`` key by key, nested mappings merged the same way.

    As jsonargparse does for a class argument, an ``optimizer`` whose ``class_path`` changes
    starts from the new class's ``init_args`` only: the old class's arguments may not exist in
    the new one.
    """
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            new_class = value.get("class_path", old.get("class_path"))
            if key == "optimizer" and new_class != old.get("class_path"):
                merged[key] = dict(value)
            else:
                merged[key] = merge_section(old, value)
        else:
            merged[key] = value
    return merged


def resume_changes(
    saved: Mapping[str, Any], current: LowPrecOptions
) -> tuple[list[str], list[str]]:
    """What differs between a checkpoint's recorded section and this run's.

    Returns:
        ``(errors, warnings)``: changes a resumed run cannot survive (the optimizer class or
        its parameter groups, whose saved state would not fit; the multipliers, whose
        parameters would be missing or unexpected) and changes it survives but that alter what
        is trained (the number format and its settings, the optimizer's hyperparameters).
    """
    before = LowPrecOptions.from_mapping(saved).as_mapping()
    now = current.as_mapping()

    def changed(key: str) -> str:
        return f"lowprec.{key}: {_show(before[key])} in the checkpoint, {_show(now[key])} now"

    errors = [changed(k) for k in ("multipliers", "param_groups") if before[k] != now[k]]
    warnings = []
    old_opt, new_opt = before["optimizer"] or {}, now["optimizer"] or {}
    if old_opt.get("class_path") != new_opt.get("class_path"):
        errors.append(changed("optimizer"))
    elif old_opt.get("init_args") != new_opt.get("init_args"):
        warnings.append(changed("optimizer"))
    warnings += [
        changed(k)
        for k in ("fmt", "include", "exclude", "rounding", "grad_rounding", "scale_rule",
                  "quantize_backward", "sample")
        if before[k] != now[k]
    ]
    return errors, warnings


def optimizer_class(spec: Mapping[str, Any]) -> type[torch.optim.Optimizer]:
    """Import the class of an optimizer spec ``{"class_path": ..., "init_args": {...}}``.

    Raises:
        ValueError: a malformed spec, a class that cannot be imported, or one that is not a
            ``torch.optim.Optimizer``; init_args the class does not accept.
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            "lowprec.optimizer must be a mapping with 'class_path' (and optionally 'init_args'), "
            f"e.g. {{'class_path': 'lightning_lowprec.LMD', 'init_args': {{'lr': 0.01}}}}; "
            f"got {spec!r}."
        )
    extra = sorted(set(spec) - {"class_path", "init_args"})
    if extra:
        raise ValueError(
            f"Unknown key(s) in lowprec.optimizer: {', '.join(extra)}. Valid keys: class_path, "
            "init_args."
        )
    path = spec["class_path"]
    module_name, _, class_name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "torch.optim"), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"lowprec.optimizer.class_path {path!r} cannot be imported ({error}). Use a dotted "
            "path such as 'lightning_lowprec.LMD', 'lightning_lowprec.MPlusAdam', "
            "'lightning_lowprec.Madam' or 'torch.optim.AdamW'."
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"lowprec.optimizer.class_path {path!r} is not a torch.optim.Optimizer.")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"lowprec.optimizer.init_args must be a mapping, got {init_args!r}.")
    accepted = constructor_defaults(cls)
    unknown = sorted(set(init_args) - set(accepted))
    if unknown:
        raise ValueError(
            f"{cls.__name__} does not accept {', '.join(unknown)}. Valid init_args: "
            f"{', '.join(sorted(accepted))}."
        )
    return cls


def build_optimizer(
    spec: Mapping[str, Any],
    model: torch.nn.Module,
    groups: Mapping[str, Any],
    **litgpt_kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` on ``model``'s named parameter groups.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}`` (see :func:`optimizer_class`).
        model: the model whose trainable parameters it gets.
        groups: extra arguments of :func:`~lightning_lowprec.optim.param_groups` (the
            section's ``param_groups``); the groups' weight decay and lr come from ``init_args``.
        litgpt_kwargs: what litgpt passes its own optimizer (such as ``fused``); used where the
            class accepts them and ``init_args`` does not set them.
    """
    from lightning_lowprec.optim.groups import param_groups

    cls = optimizer_class(spec)
    accepted = constructor_defaults(cls)
    init_args = {
        **{k: v for k, v in litgpt_kwargs.items() if k in accepted},
        **(spec.get("init_args") or {}),
    }
    weight_decay = init_args.get("weight_decay", accepted.get("weight_decay", 0.0))
    lr = init_args.get("lr", accepted.get("lr"))
    built = param_groups(
        model,
        weight_decay if isinstance(weight_decay, (int, float)) else 0.0,
        lr=lr if isinstance(lr, (int, float)) else None,
        **groups,
    )
    return cls(built, **init_args)


def constructor_defaults(cls: type) -> dict[str, Any]:
    """``cls``'s constructor arguments but ``params``, with their defaults
    (``inspect.Parameter.empty`` where there is none)."""
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if name != "params"
    }


def _check_optimizer(spec: Mapping[str, Any], groups: Mapping[str, Any]) -> None:
    """Build the optimizer once on a dummy model: every value it or
    :func:`~lightning_lowprec.optim.param_groups` rejects fails here, before litgpt starts."""
    optimizer_class(spec)
    lr = (spec.get("init_args") or {}).get("lr", 1.0)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(
            f"Invalid lowprec.optimizer.init_args.lr: {lr!r}. Valid values: a number > 0."
        )
    dummy = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    try:
        build_optimizer(spec, dummy, groups)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Invalid lowprec.optimizer {dict(spec)!r} with lowprec.param_groups "
            f"{dict(groups)!r}: {error}"
        ) from error


def _check_monitor(monitor: Mapping[str, Any]) -> None:
    from lightning_lowprec.callbacks import FabricNormMonitor

    try:
        FabricNormMonitor(**monitor)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Invalid lowprec.monitor {dict(monitor)!r}: {error}") from error


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _check_keys(name: str, mapping: Any, valid: Sequence[str]) -> None:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"lowprec.{name} must be a mapping, got {mapping!r}.")
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown key(s) in lowprec.{name}: {', '.join(unknown)}. "
            f"Valid keys: {', '.join(valid)}."
        )


def _choices(name: str, value: Any, valid: Sequence[Any]) -> str:
    shown = ", ".join("null" if v is None else repr(v) for v in valid)
    return f"Invalid lowprec.{name}: {value!r}. Valid values: {shown}."
