"""``lowprec-litgpt``: litgpt's own fine-tuning and pretraining, with this package's additions.

::

    lowprec-litgpt finetune_full CHECKPOINT_DIR --config recipes/finetune_full-lmd-mxfp6.yaml
    lowprec-litgpt finetune_lora CHECKPOINT_DIR --config recipes/finetune_lora-mplusadam-bf16.yaml
    lowprec-litgpt pretrain --config recipes/pretrain-lmd-mxfp4-multipliers.yaml
    lowprec-litgpt make_default [DIR]    # the built-in default: model, tokenizer, datasets
    lowprec-litgpt export_mx out/finetune/final  # packed MX weights beside the checkpoint

The arguments are exactly litgpt's (``litgpt finetune_full --help``), plus a ``lowprec:``
section in the YAML and ``--lowprec.KEY VALUE`` overrides (see
:class:`~lightning_lowprec.litgpt.options.LowPrecOptions`). The run is litgpt's recipe code with
our :class:`~lightning_lowprec.LowPrecision` plugin in its Fabric (litgpt's ``--precision``
becomes the plugin's autocast or parameter dtype),
:class:`~lightning_lowprec.callbacks.FabricMergeMultipliers`,
:class:`~lightning_lowprec.callbacks.FabricNormMonitor` and a progress bar as callbacks, the
``lowprec.optimizer`` built on named parameter groups, and gradient clipping without the
multipliers (fine-tuning included). How litgpt is patched is in
:mod:`lightning_lowprec.litgpt.patch`.

Outputs are plain LitGPT checkpoints: the parameters hold the point estimate whenever litgpt
saves, and multipliers are merged into the weights on save (what resuming needs besides goes
under a separate key that litgpt's loaders ignore), so ``litgpt generate out/.../final`` works.
Each checkpoint directory also gets ``lowprec.yaml`` (the section that trained it) next to
litgpt's ``hyperparameters.yaml``; the output directory gets ``lowprec_summary.json`` (steps,
training tokens, wall time, tokens/s).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from lightning_lowprec.callbacks import FabricMergeMultipliers, FabricNormMonitor
from lightning_lowprec.litgpt.options import (
    SECTION,
    LowPrecOptions,
    constructor_defaults,
    optimizer_class,
)
from lightning_lowprec.litgpt.patch import COMMANDS, patched, recipe_module
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim.groups import param_groups
from lightning_lowprec.plugin import LowPrecision

__all__ = ["main", "run", "split_args"]

PRECISIONS: dict[str, dict[str, str]] = {
    "32-true": {},
    "bf16-mixed": {"autocast": "bf16"},
    "bf16-true": {"param_dtype": "bf16"},
}
"""litgpt ``--precision`` values the runner supports, and the plugin arguments each becomes."""
SUMMARY_FILE = "lowprec_summary.json"
OPTIONS_FILE = "lowprec.yaml"
_USAGE = (
    "usage: lowprec-litgpt {finetune_full,finetune_lora,pretrain} [litgpt arguments] "
    "[--config RECIPE.yaml] [--lowprec.KEY VALUE ...]\n"
    "       lowprec-litgpt make_default [DIR]\n"
    "       lowprec-litgpt export_mx CHECKPOINT_DIR [--fmt FMT]\n"
    "Runs litgpt's own recipe with lightning-lowprec's plugin, optimizer and callbacks; "
    "see `litgpt <command> --help` for litgpt's arguments."
)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of ``lowprec-litgpt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        print(LowPrecOptions.__doc__)
        return
    command, args = argv[0], argv[1:]
    if command == "make_default":
        from lightning_lowprec.litgpt.checkpoint import make_default

        paths = make_default(*args[:1])
        print(json.dumps({name: str(path) for name, path in paths.items()}, indent=1))
        return
    if command == "export_mx":
        from lightning_lowprec.litgpt.export import main as export_main

        export_main(args)
        return
    if command not in COMMANDS:
        sys.exit(f"Unknown command {command!r}.\n{_USAGE}")
    run(command, args)


def run(command: str, args: Sequence[str]) -> dict[str, Any]:
    """Run litgpt's ``command`` with ``args`` (litgpt's arguments plus the lowprec section).

    Usable from Python as well as from the console script: nothing reads ``sys.argv``.

    Returns:
        The run summary (also written to ``<out_dir>/lowprec_summary.json``).

    Raises:
        ValueError: a bad ``lowprec`` value, a combination this runner does not support, or
            invalid litgpt arguments — all before the model is built.
    """
    recipe_module(command)  # an unknown command fails here, before any file is read
    with tempfile.TemporaryDirectory(prefix="lowprec-") as tmp:
        litgpt_args, section = split_args(args, Path(tmp))
        options = LowPrecOptions.from_mapping(section)
        return _Run(command, options, litgpt_args).execute()


def split_args(args: Sequence[str], tmp: Path) -> tuple[list[str], dict[str, Any]]:
    """Separate the ``lowprec`` section from litgpt's arguments.

    Every ``--config FILE`` that has a ``lowprec:`` key is rewritten into ``tmp`` without it;
    ``--lowprec.KEY VALUE`` / ``--lowprec.KEY=VALUE`` are removed (values parsed as YAML) and
    override the files' section.

    The config files move to the front of litgpt's arguments: jsonargparse applies arguments in
    order, so ``lowprec-litgpt finetune_full MY_CHECKPOINT --config recipe.yaml`` would
    otherwise silently train the recipe's ``checkpoint_dir`` instead of ``MY_CHECKPOINT``.
    Here the command line always wins over the files, wherever ``--config`` stands.

    Returns:
        litgpt's arguments and the merged ``lowprec`` mapping.
    """
    args = list(args)
    section: dict[str, Any] = {}
    configs: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        takes_value = not eq
        if name == "--config" or name.startswith(f"--{SECTION}."):
            if takes_value and i + 1 >= len(args):
                raise ValueError(f"{name} needs a value.")
            value = args[i + 1] if takes_value else inline
            i += 2 if takes_value else 1
            if name == "--config":
                configs += ["--config", _strip_section(Path(value), tmp, section)]
            else:
                key = name[len(SECTION) + 3:]
                section[key] = yaml.safe_load(value)
            continue
        if name == f"--{SECTION}":
            raise ValueError(
                f"Give the lowprec section in the --config file or as --{SECTION}.KEY VALUE."
            )
        out.append(arg)
        i += 1
    return configs + out, section


def _strip_section(path: Path, tmp: Path, section: dict[str, Any]) -> str:
    """Merge ``path``'s lowprec section into ``section``; return a config litgpt can read."""
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or SECTION not in config:
        return str(path)
    section.update(config.pop(SECTION) or {})
    stripped = tmp / f"{len(list(tmp.iterdir()))}-{path.name}"
    stripped.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(stripped)


class _Run:
    """One ``lowprec-litgpt`` run: the parsed configuration and the objects litgpt builds."""

    def __init__(self, command: str, options: LowPrecOptions, litgpt_args: list[str]) -> None:
        from jsonargparse import CLI, capture_parser

        self.command, self.options, self.litgpt_args = command, options, litgpt_args
        setup = recipe_module(command).setup
        self.parser = capture_parser(lambda: CLI(setup, args=litgpt_args))
        self.config = self.parser.parse_args(litgpt_args)  # litgpt's own errors, before training
        self._check_combinations()
        self.fabric: RecipeFabric | None = None
        self.tokens = 0
        self.steps = 0
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None

    def _check_combinations(self) -> None:
        options, config = self.options, self.config
        if self.command == "finetune_lora" and options.multipliers is not None:
            raise ValueError(
                "lowprec.multipliers does not combine with finetune_lora: LoRA saves only its "
                "adapter weights, so trained multipliers would be lost. Use finetune_full or "
                "pretrain, or set lowprec.multipliers: null."
            )
        if self.command == "pretrain" and options.max_norm is not None:
            raise ValueError(
                "pretrain clips gradients itself: set --train.max_norm (multipliers are left "
                "out there too) and lowprec.max_norm: null."
            )
        if self.command == "finetune_lora" and config.get("quantize"):
            raise ValueError(
                f"--quantize {config.quantize} (bitsandbytes) cannot be combined with "
                "lowprec-litgpt: a run has one precision plugin. Use lowprec.fmt instead."
            )
        precision = config.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(
                f"--precision {precision!r} is not supported by lowprec-litgpt. Valid values: "
                f"{', '.join(PRECISIONS)} (use lowprec.fmt for lower-precision matmuls)."
            )
        devices, nodes = config.get("devices", 1), config.get("num_nodes", 1)
        if str(devices) not in ("1", "auto") or nodes != 1:
            raise ValueError(
                f"lowprec-litgpt runs on one device (got devices={devices!r}, "
                f"num_nodes={nodes!r}): litgpt switches to FSDP/ModelParallel on more, which "
                "accept only their own precision plugins."
            )

    @property
    def out_dir(self) -> Path:
        from litgpt.utils import init_out_dir

        return init_out_dir(Path(self.config.out_dir))

    def execute(self) -> dict[str, Any]:
        from jsonargparse import CLI

        compile_model = (
            torch.cuda.is_available() if self.options.compile == "auto" else self.options.compile
        )
        with patched(
            self.command,
            fabric=partial(RecipeFabric, self),
            instantiate_optimizer=self.instantiate_optimizer,
            save_hyperparameters=self.save_hyperparameters,
            compile_model=compile_model,
        ) as module:
            try:
                CLI(module.setup, args=self.litgpt_args)
            finally:
                if self.fabric is not None:
                    self.fabric.close_progress_bar()
        return self.write_summary()

    def instantiate_optimizer(self, optimizer: Any, model_parameters: Any, **kwargs: Any):
        """litgpt's ``instantiate_torch_optimizer``, or ``lowprec.optimizer`` on named groups."""
        spec = self.options.optimizer
        if spec is None:
            return _litgpt_instantiate(optimizer, model_parameters, **kwargs)
        if self.fabric is None or self.fabric.model is None:
            raise RuntimeError("lowprec-litgpt: litgpt built the optimizer before the model.")
        cls = optimizer_class(spec)
        accepted = constructor_defaults(cls)
        init_args = {**{k: v for k, v in kwargs.items() if k in accepted},
                     **(spec.get("init_args") or {})}
        weight_decay = init_args.get("weight_decay", accepted.get("weight_decay", 0.0))
        lr = init_args.get("lr", accepted.get("lr"))
        groups = param_groups(self.fabric.model, weight_decay,
                              lr=lr if isinstance(lr, (int, float)) else None,
                              **self.options.param_groups)
        return cls(groups, **init_args)

    def save_hyperparameters(self, function: Any, checkpoint_dir: Path, *_: Any) -> None:
        """What litgpt's ``save_hyperparameters`` means to write, without reading ``sys.argv``."""
        checkpoint_dir = Path(checkpoint_dir)
        self.parser.save(self.config, checkpoint_dir / "hyperparameters.yaml", overwrite=True)
        (checkpoint_dir / OPTIONS_FILE).write_text(
            yaml.safe_dump({SECTION: self.options.as_mapping()}, sort_keys=False)
        )

    def count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the model: count the tokens of training forwards."""
        if module.training and torch.is_grad_enabled() and args:
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
            self.tokens += args[0].numel()

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        self.steps += 1
        self.last_step_at = time.perf_counter()

    def write_summary(self) -> dict[str, Any]:
        seconds = (
            self.last_step_at - self.first_step_at
            if self.first_step_at is not None and self.last_step_at is not None
            else math.nan
        )
        summary = {
            "command": self.command,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": seconds,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else math.nan,
            SECTION: self.options.as_mapping(),
        }
        out_dir = self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def _litgpt_instantiate(optimizer: Any, model_parameters: Any, **kwargs: Any):
    from litgpt.utils import instantiate_torch_optimizer

    return instantiate_torch_optimizer(optimizer, model_parameters, **kwargs)


class _ProgressBar:
    """Fabric callback: a tqdm bar over the optimizer steps (rank 0)."""

    def __init__(self, total: int | None) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class RecipeFabric(L.Fabric):
    """The Fabric litgpt's recipe gets: litgpt's arguments, our plugin and callbacks.

    litgpt's precision string becomes the plugin's autocast or parameter dtype
    (:data:`PRECISIONS`). At ``setup``/``setup_module`` the model gets its multipliers (before
    the plugin converts it, so quantized layers quantize the effective weight), the run starts
    counting its tokens, and the callbacks' ``on_after_setup`` fires (Fabric fires it from
    ``setup`` only; LoRA uses ``setup_module``). ``setup_optimizers`` adds clipping before
    each step when ``lowprec.max_norm`` is set and, for ``pretrain``, keeps the groups'
    learning-rate ratios (:func:`_keep_lr_ratios`).
    """

    def __init__(
        self,
        run: _Run,
        *,
        precision: str | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        **kwargs: Any,
    ) -> None:
        if plugins is not None:
            raise ValueError("lowprec-litgpt: litgpt asked for another precision plugin.")
        options = run.options
        plugin = LowPrecision(
            options.fmt,
            include=options.include,
            exclude=options.exclude,
            rounding=options.rounding,
            quantize_backward=options.quantize_backward,
            sample=options.sample,
            **PRECISIONS[precision or "bf16-mixed"],
        )
        ours: list[Any] = [FabricMergeMultipliers(), run]
        if options.monitor is not None:
            ours.append(FabricNormMonitor(**options.monitor))
        self._progress = None
        if options.progress_bar:
            self._progress = _ProgressBar(_total_steps(run.config))
            ours.append(self._progress)
        super().__init__(plugins=[plugin], callbacks=[*(callbacks or []), *ours], **kwargs)
        run.fabric = self
        self._run = run
        self.model: nn.Module | None = None
        self._wrapped: nn.Module | None = None

    def setup(self, module: nn.Module, *optimizers: Any, **kwargs: Any) -> Any:
        self._prepare(module)
        out = super().setup(module, *optimizers, **kwargs)
        self._wrapped = out[0] if optimizers else out
        return out

    def setup_module(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._prepare(module)
        wrapped = super().setup_module(module, *args, **kwargs)
        self._wrapped = wrapped
        self.call("on_after_setup", fabric=self, module=wrapped)
        return wrapped

    def setup_optimizers(self, *optimizers: Any) -> Any:
        out = super().setup_optimizers(*optimizers)
        max_norm = self._run.options.max_norm
        for optimizer in out if isinstance(out, tuple) else (out,):
            if max_norm is not None:
                _clip_before_step(self, optimizer, max_norm)
            if self._run.command == "pretrain":
                _keep_lr_ratios(optimizer)
        return out

    def _prepare(self, module: nn.Module) -> None:
        model = getattr(module, "_orig_mod", module)  # pretrain wraps it in torch.compile
        if self._run.options.multipliers is not None:
            add_multipliers(model, placement=self._run.options.multipliers)
        model.register_forward_pre_hook(self._run.count)
        self.model = model

    def close_progress_bar(self) -> None:
        if self._progress is not None:
            self._progress.close()


def _around_step(optimizer: Any, around: Callable[[Any], AbstractContextManager]) -> None:
    """Make every ``optimizer.step()`` run inside ``around(optimizer)``.

    The new ``step`` is a bound method, as torch's LR schedulers expect when they wrap
    ``step`` in turn.
    """
    step = optimizer.step

    def step_around(self: Any, *args: Any, **kwargs: Any) -> Any:
        with around(self):
            return step(*args, **kwargs)

    optimizer.step = types.MethodType(step_around, optimizer)


def _clip_before_step(fabric: RecipeFabric, optimizer: Any, max_norm: float) -> None:
    """Make ``optimizer.step()`` clip the gradients first (through the plugin: multipliers out).

    ``error_if_nonfinite=False``: a non-finite gradient reaches the optimizer, which skips that
    parameter's step and counts it, instead of stopping the run.
    """

    @contextmanager
    def clipped(opt: Any) -> Iterator[None]:
        fabric.clip_gradients(fabric._wrapped, opt, max_norm=max_norm, error_if_nonfinite=False)
        yield

    _around_step(optimizer, clipped)


def _keep_lr_ratios(optimizer: Any) -> None:
    """Make each ``optimizer.step()`` use every group's lr times its ratio at setup.

    litgpt's ``pretrain`` sets every group's ``lr`` to its schedule's value (from
    ``defaults["lr"]``) before each step, which would erase a group's own rate (e.g.
    ``lowprec.param_groups.multiplier_lr_ratio``). The ratio ``group lr / defaults lr`` is taken
    here, applied for the duration of each step and undone after it, so the schedule's value
    is what litgpt reads and saves. Nothing is wrapped when every ratio is 1.
    """
    base = optimizer.defaults["lr"]
    ratios = [group["lr"] / base for group in optimizer.param_groups]
    if all(r == 1.0 for r in ratios):
        return

    @contextmanager
    def at_ratios(opt: Any) -> Iterator[None]:
        scheduled = [group["lr"] for group in opt.param_groups]
        for group, ratio in zip(opt.param_groups, ratios, strict=True):
            group["lr"] = group["lr"] * ratio
        try:
            yield
        finally:
            for group, lr in zip(opt.param_groups, scheduled, strict=True):
                group["lr"] = lr

    _around_step(optimizer, at_ratios)


def _total_steps(config: Any) -> int | None:
    """The run's optimizer steps when litgpt's arguments fix them: ``--train.max_steps``, or
    for ``pretrain`` ``--train.max_tokens`` (litgpt's own arithmetic, one device)."""
    train = config.get("train")
    if train is None:
        return None
    if train.get("max_steps"):
        return int(train.max_steps)
    micro, seq = train.get("micro_batch_size"), train.get("max_seq_length")
    if train.get("max_tokens") and micro and seq and train.get("global_batch_size"):
        return (train.max_tokens // (micro * seq)) // (train.global_batch_size // micro)
    return None
