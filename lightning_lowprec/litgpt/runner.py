"""``lowprec-litgpt``: litgpt's own fine-tuning and pretraining, with this package's additions.

::

    lowprec-litgpt finetune_full CHECKPOINT_DIR --config finetune_full-lmd-mxfp6
    lowprec-litgpt finetune_lora CHECKPOINT_DIR --config finetune_lora-mplusadam-bf16
    lowprec-litgpt pretrain --config pretrain-lmd-mxfp4-multipliers
    lowprec-litgpt recipes [NAME]        # list the shipped recipes, or print one
    lowprec-litgpt make_default [DIR]    # the built-in default: model, tokenizer, datasets
    lowprec-litgpt export_mx out/finetune/final  # packed MX weights beside the checkpoint

The arguments are exactly litgpt's (``litgpt finetune_full --help``), plus a ``lowprec:``
section in the YAML and ``--lowprec.KEY VALUE`` overrides (see
:class:`~lightning_lowprec.litgpt.options.LowPrecOptions`); ``--config`` takes a file or the name
of a shipped recipe (:mod:`lightning_lowprec.litgpt.recipes`). The run is litgpt's recipe code
with our :class:`~lightning_lowprec.LowPrecision` plugin in its Fabric (litgpt's ``--precision``
becomes the plugin's autocast or parameter dtype),
:class:`~lightning_lowprec.callbacks.FabricMergeMultipliers`,
:class:`~lightning_lowprec.callbacks.FabricNormMonitor` and a progress bar as callbacks, the
``lowprec.optimizer`` built on named parameter groups, and gradient clipping without the
multipliers (fine-tuning included). How litgpt is patched is in
:mod:`lightning_lowprec.litgpt.patch`.

What ran is what is recorded: with ``lowprec.optimizer`` set, litgpt is given that optimizer as
its ``--optimizer`` too, so the config litgpt prints and saves (``hyperparameters.yaml``) names
the optimizer that trained (a different ``--optimizer`` is refused). Every configuration error
is found before data or model are built: the console prints its message and exits with status 2.

Outputs are plain LitGPT checkpoints: the parameters hold the point estimate whenever litgpt
saves, and multipliers are merged into the weights on save (what resuming needs besides goes
under a separate key that litgpt's loaders ignore), so ``litgpt generate out/.../final`` works.
Each checkpoint directory also gets ``lowprec.yaml`` (the section that trained it) next to
litgpt's ``hyperparameters.yaml``; a ``--resume`` compares it with the current section first
(:func:`~lightning_lowprec.litgpt.options.resume_changes`). litgpt's resumable checkpoints
also hold the run's counters under :data:`RUN_STATE_KEY`, so that after a resume the monitor's
TensorBoard steps, the progress bar and ``lowprec_summary.json`` (steps, training tokens, wall
time, tokens/s over all sessions) continue where the run stopped.

On several devices (``--devices N``, ``--num_nodes``) litgpt would build ``FSDPStrategy``
(FSDP1), which accepts no precision plugin but its own; the runner's Fabric uses FSDP2 instead
(``lowprec.strategy: fsdp2``, the default: Lightning's ``ModelParallelStrategy`` with
:func:`~lightning_lowprec.fsdp.fully_shard_blocks`, data parallel over all devices) or DDP
(``lowprec.strategy: ddp``). Under FSDP2 every checkpoint is one *full* file (Lightning's
``save_distributed_checkpoint=False``: rank 0 writes the gathered weights and optimizer state),
so ``litgpt generate`` loads the outputs and ``--resume`` reads them on any number of devices;
with multipliers they are merged and resume exactly, as on one device (``scalar`` multipliers,
0-dim, cannot be sharded: DDP only).
Lightning starts the extra processes by re-running this process's command line, so a
multi-device run starts from ``lowprec-litgpt`` / ``python -m lightning_lowprec.litgpt``, or
under ``torchrun``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import textwrap
import time
import types
import warnings
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
from lightning_lowprec.fsdp import fully_shard_blocks
from lightning_lowprec.litgpt.options import (
    SECTION,
    LowPrecOptions,
    build_optimizer,
    load_yaml,
    merge_section,
    resume_changes,
)
from lightning_lowprec.litgpt.patch import COMMANDS, patched, recipe_module
from lightning_lowprec.litgpt.recipes import recipe_names, recipe_path, recipe_summary
from lightning_lowprec.multipliers import add_multipliers, restarted_state_dict
from lightning_lowprec.nn import QuantizedLinear
from lightning_lowprec.optim.groups import is_multiplier
from lightning_lowprec.plugin import LowPrecision

__all__ = ["ConfigError", "main", "run", "split_args"]

PRECISIONS: dict[str, dict[str, str]] = {
    "32-true": {},
    "bf16-mixed": {"autocast": "bf16"},
    "bf16-true": {"param_dtype": "bf16"},
}
"""litgpt ``--precision`` values the runner supports, and the plugin arguments each becomes."""
SUMMARY_FILE = "lowprec_summary.json"
OPTIONS_FILE = "lowprec.yaml"
RUN_STATE_KEY = "lowprec_run"
"""Key of the run's counters (steps, tokens, seconds, sessions) in litgpt's resumable state."""
CONFIG_ERROR_STATUS = 2
_FROM_CONSOLE = False
"""Whether this process runs :func:`main` (Lightning's launcher re-runs its command line)."""
_USAGE = (
    "usage: lowprec-litgpt {finetune_full,finetune_lora,pretrain} [litgpt arguments] "
    "[--config RECIPE] [--lowprec.KEY VALUE ...]\n"
    "       lowprec-litgpt recipes [NAME]\n"
    "       lowprec-litgpt make_default [DIR]\n"
    "       lowprec-litgpt export_mx CHECKPOINT_DIR [--fmt FMT]\n"
    "Runs litgpt's own recipe with lightning-lowprec's plugin, optimizer and callbacks. "
    "RECIPE: a file, or a shipped recipe's name (lowprec-litgpt recipes). "
    "`lowprec-litgpt <command> --help` lists litgpt's arguments and the lowprec section."
)


class ConfigError(ValueError):
    """A configuration ``lowprec-litgpt`` cannot run, found before data or model are built."""


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of ``lowprec-litgpt``: a configuration error prints its message
    and exits with status 2 (no traceback)."""
    global _FROM_CONSOLE
    _FROM_CONSOLE = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        print()
        print(lowprec_help())
        return
    command, args = argv[0], argv[1:]
    if command == "make_default":
        from lightning_lowprec.litgpt.checkpoint import make_default

        paths = make_default(*args[:1])
        print(json.dumps({name: str(path) for name, path in paths.items()}, indent=1))
        return
    try:
        if command == "recipes":
            print(_recipes(args), end="" if args else "\n")
            return
        if command == "export_mx":
            from lightning_lowprec.litgpt.export import main as export_main

            export_main(args)
            return
        if command not in COMMANDS:
            raise ConfigError(f"Unknown command {command!r}.\n{_USAGE}")
        with configured(command, args) as job:
            if job is not None:
                job.execute()
    except ConfigError as error:
        print(f"lowprec-litgpt: error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)


def run(command: str, args: Sequence[str]) -> dict[str, Any]:
    """Run litgpt's ``command`` with ``args`` (litgpt's arguments plus the lowprec section).

    Usable from Python as well as from the console script: nothing reads ``sys.argv``.
    ``--help`` and ``--print_config`` print (litgpt's and the lowprec section's) and return
    ``{}``.

    Returns:
        The run summary (also written to ``<out_dir>/lowprec_summary.json``).

    Raises:
        ConfigError: (a ``ValueError``) a bad ``lowprec`` value, a combination this runner does
            not support, or invalid litgpt arguments — all before the model is built.
    """
    with configured(command, args) as job:
        return {} if job is None else job.execute()


@contextmanager
def configured(command: str, args: Sequence[str]) -> Iterator[_Run | None]:
    """The validated run of ``command`` (``None`` when ``args`` asked for help or the config).

    The stripped config files live in a temporary directory for the duration of the block.

    Raises:
        ConfigError: anything wrong with the configuration.
    """
    with tempfile.TemporaryDirectory(prefix="lowprec-") as tmp:
        try:
            recipe_module(command)  # an unknown command fails here, before any file is read
            args = list(args)
            wants_help = any(a in ("-h", "--help") for a in args)
            print_config = [a for a in args if a.startswith("--print_config")]
            args = [a for a in args if a not in ("-h", "--help") and a not in print_config]
            litgpt_args, section = split_args(args, Path(tmp))
            if wants_help:
                _parser(command, litgpt_args).print_help()
                print()
                print(lowprec_help())
                job = None
            else:
                job = _Run(command, LowPrecOptions.from_mapping(section), litgpt_args)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if job is not None and print_config:
            print(job.parser.dump(job.config, skip_none=False), end="")
            print(yaml.safe_dump({SECTION: job.options.as_mapping()}, sort_keys=False), end="")
            job = None
        yield job


def lowprec_help() -> str:
    """The lowprec section's keys, as plain text (the options' docstring without markup, the
    named constants spelled out)."""
    from lightning_lowprec.formats import FORMATS
    from lightning_lowprec.litgpt.options import ACCELERATORS, GROUP_KEYS, MONITOR_KEYS, STRATEGIES
    from lightning_lowprec.multipliers import PLACEMENTS

    doc = LowPrecOptions.__doc__ or ""
    text = _plain(textwrap.dedent(doc[doc.index("Attributes:") + len("Attributes:"):]))
    for name, values in (("FORMATS", FORMATS), ("PLACEMENTS", PLACEMENTS),
                         ("GROUP_KEYS", GROUP_KEYS), ("MONITOR_KEYS", MONITOR_KEYS),
                         ("STRATEGIES", STRATEGIES), ("ACCELERATORS", ACCELERATORS)):
        text = re.sub(rf"\b{name}\b", ", ".join(values), text)
    return "The lowprec section (--lowprec.KEY VALUE, nested keys too):\n" + text.rstrip()


def _plain(text: str) -> str:
    """reStructuredText roles and literals as plain text (``:class:`~a.B``` -> ``B``)."""
    text = re.sub(r":\w+:`~?([^`]*\.)?([^`.]+)`", r"\2", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def _recipes(args: Sequence[str]) -> str:
    """``lowprec-litgpt recipes [NAME]``: the list of shipped recipes, or one recipe's text."""
    if args:
        try:
            return recipe_path(args[0]).read_text()
        except ValueError as error:
            raise ConfigError(str(error)) from error
    width = max(len(name) for name in recipe_names())
    lines = [f"{name:<{width}}  {recipe_summary(name)}" for name in recipe_names()]
    return "\n".join([*lines, "", "lowprec-litgpt recipes NAME prints one; "
                       "--config NAME runs it."])


def _parser(command: str, litgpt_args: Sequence[str]) -> Any:
    from jsonargparse import CLI, capture_parser

    setup = recipe_module(command).setup
    return capture_parser(lambda: CLI(setup, args=list(litgpt_args)))


def split_args(args: Sequence[str], tmp: Path) -> tuple[list[str], dict[str, Any]]:
    """Separate the ``lowprec`` section from litgpt's arguments.

    Every ``--config FILE_OR_RECIPE`` that has a ``lowprec:`` key is rewritten into ``tmp``
    without it; ``--lowprec.KEY VALUE`` / ``--lowprec.KEY=VALUE`` are removed (values parsed as
    jsonargparse parses litgpt's; dotted keys reach into nested mappings) and override the
    files' sections, which merge in order (:func:`~lightning_lowprec.litgpt.options.
    merge_section`). ``--accelerator VALUE`` (which litgpt lacks) is ``--lowprec.accelerator``.

    The config files move to the front of litgpt's arguments: jsonargparse applies arguments in
    order, so ``lowprec-litgpt finetune_full MY_CHECKPOINT --config recipe.yaml`` would
    otherwise silently train the recipe's ``checkpoint_dir`` instead of ``MY_CHECKPOINT``.
    Here the command line always wins over the files, wherever ``--config`` stands.

    Returns:
        litgpt's arguments and the merged ``lowprec`` mapping.
    """
    args = list(args)
    section: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    configs: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        takes_value = not eq
        if name == "--accelerator":
            name = f"--{SECTION}.accelerator"
        if name == "--config" or name.startswith(f"--{SECTION}."):
            if takes_value and i + 1 >= len(args):
                raise ValueError(f"{name} needs a value.")
            value = args[i + 1] if takes_value else inline
            i += 2 if takes_value else 1
            if name == "--config":
                path, file_section = _strip_section(recipe_path(value), tmp)
                configs += ["--config", path]
                section = merge_section(section, file_section)
            else:
                keys = name[len(SECTION) + 3:].split(".")
                override: Any = load_yaml(value)
                for key in reversed(keys):
                    override = {key: override}
                overrides = merge_section(overrides, override)
            continue
        if name == f"--{SECTION}":
            raise ValueError(
                f"Give the lowprec section in the --config file or as --{SECTION}.KEY VALUE."
            )
        out.append(arg)
        i += 1
    return configs + out, merge_section(section, overrides)


def _strip_section(path: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
    """``path``'s lowprec section, and a config litgpt can read (``path`` without it)."""
    config = load_yaml(path.read_text()) or {}
    if not isinstance(config, dict) or SECTION not in config:
        return str(path), {}
    section = config.pop(SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: the lowprec section must be a mapping, got {section!r}.")
    stripped = tmp / f"{len(list(tmp.iterdir()))}-{path.name}"
    stripped.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(stripped), section


class _Run:
    """One ``lowprec-litgpt`` run: the parsed configuration and the objects litgpt builds."""

    def __init__(self, command: str, options: LowPrecOptions, litgpt_args: list[str]) -> None:
        self.command, self.options = command, options
        self.parser = _parser(command, litgpt_args)
        config = self.parser.parse_args(litgpt_args)  # litgpt's own errors, before training
        if options.optimizer is not None:
            _check_one_optimizer(config.get("optimizer"),
                                 self.parser.get_defaults().get("optimizer"), options.optimizer)
            # litgpt prints and saves the optimizer that trains, not its default.
            litgpt_args = [*litgpt_args, "--optimizer", json.dumps(options.optimizer)]
            config = self.parser.parse_args(litgpt_args)
        self.litgpt_args, self.config = litgpt_args, config
        self._check_combinations()
        self._check_resume()
        self.fabric: RecipeFabric | None = None
        self.tokens = 0
        self.steps = 0
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None
        self.previous = {"tokens": 0, "train_seconds": 0.0, "sessions": 0}
        """What earlier sessions of a resumed run did (from the checkpoint's RUN_STATE_KEY)."""
        self.resumed_steps = 0

    def _check_combinations(self) -> None:
        from litgpt import utils

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
        if precision is None:
            default = utils.get_default_supported_precision(training=True)
            if default not in PRECISIONS:
                raise ValueError(
                    f"litgpt's default --precision on this machine is {default!r} (a GPU "
                    "without bf16), which lowprec-litgpt does not support. Pass --precision "
                    f"with one of: {', '.join(PRECISIONS)} (32-true on this GPU)."
                )
        elif precision not in PRECISIONS:
            raise ValueError(
                f"--precision {precision!r} is not supported by lowprec-litgpt. Valid values: "
                f"{', '.join(PRECISIONS)} (use lowprec.fmt for lower-precision matmuls)."
            )
        if _world_size(config) > 1:
            self._check_distributed()
        train = config.get("train")
        total = _total_steps(config)
        warmup = train.get("lr_warmup_steps") if train is not None else None
        if self.command != "pretrain" and warmup is not None and warmup < 1:
            raise ValueError(
                f"--train.lr_warmup_steps {warmup} must be >= 1: litgpt's fine-tuning warm-up "
                "divides by it."
            )
        if total is not None and warmup is not None and warmup >= total:
            raise ValueError(
                f"--train.lr_warmup_steps {warmup} must be smaller than the run's {total} "
                "optimizer steps: litgpt's cosine schedule decays over the steps after the "
                "warm-up (and divides by their number). Lower --train.lr_warmup_steps."
            )

    def _check_distributed(self) -> None:
        """What a run on several devices needs, checked before any process starts."""
        options, config = self.options, self.config
        world = _world_size(config)
        where = f"--devices {config.get('devices')!r} --num_nodes {config.get('num_nodes', 1)!r}"
        if not (_FROM_CONSOLE or "LOCAL_RANK" in os.environ):
            raise ValueError(
                f"{where} ({world} processes): Lightning starts the extra processes by "
                f"re-running this process's command line ({' '.join(sys.argv[:2])} ...), which "
                "is not lowprec-litgpt. Run `lowprec-litgpt ...` or `python -m "
                "lightning_lowprec.litgpt ...`, or start the processes with torchrun."
            )
        if options.strategy == "fsdp2" and options.multipliers == "scalar":
            raise ValueError(
                f"lowprec.multipliers 'scalar' with lowprec.strategy fsdp2 ({where}): FSDP2 "
                "shards every parameter along dim 0, which a 0-dim scalar multiplier does not "
                "have. Use lowprec.multipliers 'paper' or 'symmetry_free' (vectors), or "
                "--lowprec.strategy ddp."
            )
        train = config.get("train")
        if train is not None and train.get("global_batch_size") and train.get("micro_batch_size"):
            per_device = train.global_batch_size // world
            if per_device < train.micro_batch_size:
                raise ValueError(
                    f"--train.global_batch_size {train.global_batch_size} over {world} devices "
                    f"is {per_device} per device, less than --train.micro_batch_size "
                    f"{train.micro_batch_size}: litgpt needs at least one micro-batch per "
                    f"device and step. Set --train.micro_batch_size {max(1, per_device)} or "
                    f"--train.global_batch_size {world * train.micro_batch_size}."
                )

    def _check_resume(self) -> None:
        """Compare the checkpoint's lowprec section with this run's before anything is built.

        Raises:
            ValueError: a change the resumed state cannot follow (optimizer class, parameter
                groups, multipliers). Other changes (format, hyperparameters) warn.
        """
        from litgpt.utils import find_resume_path

        resume = self.config.get("resume")
        if not resume:
            return
        try:
            path = find_resume_path(resume if resume == "auto" or resume is True
                                    else Path(resume), self.out_dir)
        except FileNotFoundError:
            return  # litgpt says so itself
        recorded = Path(path).parent / OPTIONS_FILE if path else None
        if recorded is None or not recorded.is_file():
            if path:
                warnings.warn(f"Resuming from {path}: it has no {OPTIONS_FILE}, so this run's "
                              "lowprec section cannot be checked against it.", stacklevel=2)
            return
        saved = (load_yaml(recorded.read_text()) or {}).get(SECTION) or {}
        errors, changes = resume_changes(saved, self.options)
        if errors:
            raise ValueError(
                f"Cannot resume from {path} with a different lowprec section: "
                + "; ".join(errors)
                + f". Use the section of {recorded} (e.g. --config {recorded}) or start a new "
                "--out_dir."
            )
        for change in changes:
            warnings.warn(f"Resuming from {path} with a change: {change}.", stacklevel=2)

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
            load_checkpoint=load_checkpoint,
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
        return build_optimizer(spec, self.fabric.model, self.options.param_groups, **kwargs)

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

    def session_seconds(self) -> float:
        if self.first_step_at is None or self.last_step_at is None:
            return math.nan
        return self.last_step_at - self.first_step_at

    def state_dict(self) -> dict[str, Any]:
        """The run's counters over all sessions so far (saved in litgpt's resumable state)."""
        seconds = self.session_seconds()
        return {
            "tokens": self.previous["tokens"] + self.session_tokens(),
            "train_seconds": self.previous["train_seconds"] + (0.0 if math.isnan(seconds)
                                                               else seconds),
            "sessions": self.previous["sessions"] + 1,
        }

    def load_state_dict(self, state: dict[str, Any], steps: int) -> None:
        """Continue the counters of a checkpoint that had taken ``steps`` optimizer steps."""
        self.previous = {"tokens": 0, "train_seconds": 0.0, "sessions": 1, **state}
        self.resumed_steps = steps

    def session_tokens(self) -> int:
        """This session's training tokens on all processes (a collective call when there are
        several: every rank calls it, from ``save`` and at the end)."""
        fabric = self.fabric
        if fabric is None or fabric.world_size == 1:
            return self.tokens
        counted = torch.tensor(self.tokens, dtype=torch.long, device=fabric.device)
        return int(fabric.all_reduce(counted, reduce_op="sum").item())

    def write_summary(self) -> dict[str, Any]:
        """``lowprec_summary.json``: steps, tokens and seconds over every session of the run
        (a resumed run includes the sessions before), and this session's alone, with the
        Lightning strategy that ran. Tokens count every process; rank 0 writes the file."""
        seconds = self.session_seconds()
        session_tokens = self.session_tokens()
        fabric = self.fabric
        session = {
            "steps": self.steps,
            "tokens": session_tokens,
            "train_seconds": seconds,
            "tokens_per_second": session_tokens / seconds if seconds > 0 else math.nan,
        }
        total_seconds = self.previous["train_seconds"] + (0.0 if math.isnan(seconds) else seconds)
        tokens = self.previous["tokens"] + session_tokens
        summary = {
            "command": self.command,
            "steps": self.resumed_steps + self.steps,
            "tokens": tokens,
            "train_seconds": total_seconds if total_seconds > 0 else math.nan,
            "tokens_per_second": tokens / total_seconds if total_seconds > 0 else math.nan,
            "sessions": self.previous["sessions"] + 1,
            "session": session,
            "strategy": None if fabric is None else type(fabric.strategy).__name__,
            "world_size": 1 if fabric is None else fabric.world_size,
            SECTION: self.options.as_mapping(),
        }
        if fabric is None or fabric.global_rank == 0:
            out_dir = self.out_dir
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary


def _check_one_optimizer(given: Any, default: Any, spec: dict[str, Any]) -> None:
    """Refuse a litgpt ``--optimizer`` beside ``lowprec.optimizer`` (one of them would not
    train); the default, or the same optimizer, is fine."""
    if given == default or given == spec:
        return
    raise ValueError(
        f"--optimizer {given!r} and lowprec.optimizer {spec!r} both name the optimizer; only "
        "one can train. Remove --optimizer (lowprec.optimizer is built on named parameter "
        "groups), or set lowprec.optimizer: null to train litgpt's."
    )


def _litgpt_instantiate(optimizer: Any, model_parameters: Any, **kwargs: Any):
    from litgpt.utils import instantiate_torch_optimizer

    return instantiate_torch_optimizer(optimizer, model_parameters, **kwargs)


class _ProgressBar:
    """Fabric callback: a tqdm bar over the optimizer steps (rank 0); prints go above it.

    The bar is made at its first use, when the process knows its rank (not yet when litgpt
    builds the Fabric): the other ranks' bars are disabled.
    """

    def __init__(self, total: int | None, fabric: L.Fabric) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self._total, self._fabric = tqdm, total, fabric
        self._made: Any = None

    @property
    def _bar(self) -> Any:
        if self._made is None:
            self._made = self._tqdm(total=self._total, unit="step", dynamic_ncols=True,
                                    leave=True, disable=self._fabric.global_rank != 0)
        return self._made

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        self._bar.update(1)

    def resume(self, steps: int) -> None:
        """Continue from ``steps`` steps done (a resumed run)."""
        self._bar.n = self._bar.last_print_n = steps
        self._bar.refresh()

    def write(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        if self._made is not None:
            self._made.close()


class _RecipeNormMonitor(FabricNormMonitor):
    """FabricNormMonitor on litgpt's x-axis.

    litgpt logs a training iteration's metrics at its micro-batch count ``iter_num``
    (``finetune_*``) or ``iter_num - 1`` (``pretrain``); optimizer step ``k`` ends iteration
    ``k · accumulation``. The monitor logs step ``k`` there, so its tags and litgpt's ``loss``
    share their steps, with gradient accumulation and after a resume too.
    """

    def __init__(self, accumulation: int, offset: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._accumulation, self._offset = accumulation, offset

    def log_step(self, step: int) -> int:
        return step * self._accumulation + self._offset


class RecipeFabric(L.Fabric):
    """The Fabric litgpt's recipe gets: litgpt's arguments, our plugin and callbacks.

    litgpt's precision string becomes the plugin's autocast or parameter dtype
    (:data:`PRECISIONS`); on several devices litgpt's strategy becomes ``lowprec.strategy``'s
    (:func:`distributed_strategy`), and ``lowprec.accelerator`` is passed on. At
    ``setup``/``setup_module`` the model gets its multipliers (before the plugin converts it,
    so quantized layers quantize the effective weight), the run starts counting its tokens,
    and the callbacks' ``on_after_setup`` fires (Fabric fires it from ``setup`` only; LoRA
    uses ``setup_module``). ``setup_optimizers`` adds clipping before
    each step when ``lowprec.max_norm`` is set and, for ``pretrain``, keeps the groups'
    learning-rate ratios (:func:`_keep_lr_ratios`), then prints one line saying what the
    lowprec section applied. ``save`` adds the run's counters to litgpt's resumable state and
    ``load`` restores them, the monitor's step and the progress bar. ``print`` writes above the
    progress bar.
    """

    def __init__(
        self,
        run: _Run,
        *,
        precision: str | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        strategy: Any = "auto",
        **kwargs: Any,
    ) -> None:
        if plugins is not None:
            raise ValueError("lowprec-litgpt: litgpt asked for another precision plugin.")
        options = run.options
        world = _world_size(run.config)
        if world > 1:
            strategy = distributed_strategy(options.strategy, world)
        plugin = LowPrecision(
            options.fmt,
            include=options.include,
            exclude=options.exclude,
            rounding=options.rounding,
            grad_rounding=options.grad_rounding,
            scale_rule=options.scale_rule,
            quantize_backward=options.quantize_backward,
            backend=options.backend,
            sample=options.sample,
            **PRECISIONS[precision or "bf16-mixed"],
        )
        # Only with multipliers (without, it changes nothing): it wraps the CheckpointIO, or
        # under FSDP2 the strategy's full-checkpoint save and load.
        ours: list[Any] = [run] if options.multipliers is None else [FabricMergeMultipliers(), run]
        self._monitor: _RecipeNormMonitor | None = None
        if options.monitor is not None:
            self._monitor = _RecipeNormMonitor(
                _accumulation(run.config), -1 if run.command == "pretrain" else 0,
                **options.monitor,
            )
            ours.append(self._monitor)
        self._progress = None
        if options.progress_bar:
            self._progress = _ProgressBar(_total_steps(run.config), self)
            ours.append(self._progress)
        super().__init__(plugins=[plugin], callbacks=[*(callbacks or []), *ours],
                         strategy=strategy, accelerator=options.accelerator, **kwargs)
        run.fabric = self
        self._run = run
        self.model: nn.Module | None = None
        self._wrapped: nn.Module | None = None

    def init_module(self, empty_init: bool | None = None) -> AbstractContextManager:
        """Under FSDP2 the model is built on the CPU, not on the meta device as litgpt asks:
        litgpt's weight initialisation (``pretrain``) then runs on real tensors before
        sharding, as on one device, instead of each layer's default ``reset_parameters`` at
        FSDP2's materialisation. Costs one full model in host memory per process."""
        from lightning.fabric.strategies import ModelParallelStrategy

        if isinstance(self.strategy, ModelParallelStrategy):
            empty_init = False
        return super().init_module(empty_init=empty_init)

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
        self.print(applied(self._run, self.model, optimizers))
        return out

    def save(self, path: Any, state: dict[str, Any], filter: Any = None) -> None:
        if "optimizer" in state and "step_count" in state:  # litgpt's resumable state
            state = {**state, RUN_STATE_KEY: self._run.state_dict()}
        super().save(path, state, filter=filter)

    def load(self, path: Any, state: dict[str, Any] | None = None, strict: bool = True,
             **kwargs: Any) -> dict[str, Any]:
        remainder = super().load(path, state, strict=strict, **kwargs)
        if state is not None and "step_count" in state:
            steps = int(state["step_count"])
            self._run.load_state_dict(remainder.pop(RUN_STATE_KEY, {}), steps)
            if self._monitor is not None:
                self._monitor.load_state_dict({"step": steps})
            if self._progress is not None:
                self._progress.resume(steps)
        return remainder

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is None or self.local_rank != 0 or set(kwargs) - {"sep"}:
            super().print(*args, **kwargs)
        else:
            self._progress.write(kwargs.get("sep", " ").join(str(a) for a in args))

    def _prepare(self, module: nn.Module) -> None:
        model = getattr(module, "_orig_mod", module)  # pretrain wraps it in torch.compile
        if self._run.options.multipliers is not None:
            add_multipliers(model, placement=self._run.options.multipliers)
        model.register_forward_pre_hook(self._run.count)
        self.model = model

    def close_progress_bar(self) -> None:
        if self._progress is not None:
            self._progress.close()


def load_checkpoint(fabric: L.Fabric, model: nn.Module, checkpoint_path: Path,
                    strict: bool = True) -> None:
    """litgpt's ``load_checkpoint``, with a correct FSDP2 branch: the full state dict (under
    ``"model"`` or at the top level) is loaded into the shards by
    ``torch.distributed.checkpoint``'s ``set_model_state_dict``; multiplied layers take the
    checkpoint's weights with multipliers 1, as on one device; a LoRA model's
    ``...linear.weight`` takes the base checkpoint's ``....weight``, as LoRA's own loading
    hook maps it on one device. Other strategies: litgpt's own."""
    from lightning.fabric.strategies import ModelParallelStrategy
    from lightning.fabric.wrappers import _unwrap_objects
    from litgpt.utils import load_checkpoint as litgpt_load_checkpoint

    if not isinstance(fabric.strategy, ModelParallelStrategy):
        litgpt_load_checkpoint(fabric, model, checkpoint_path, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = _unwrap_objects(model)
    full = torch.load(checkpoint_path, mmap=True, map_location="cpu", weights_only=True)
    full = restarted_state_dict(full.get("model", full), module)
    for key in module.state_dict():
        base = key.replace(".linear.", ".")
        if key not in full and base in full:
            full[key] = full.pop(base)
    set_model_state_dict(module, full,
                         options=StateDictOptions(full_state_dict=True, strict=strict))


def distributed_strategy(name: str, world_size: int) -> Any:
    """The Lightning strategy of ``lowprec.strategy`` ``name`` over ``world_size`` processes.

    ``"fsdp2"``: ``ModelParallelStrategy`` sharding each transformer block and the root over
    all processes (data parallel only) and saving *full* checkpoints (gathered on rank 0: what
    litgpt's loaders and ``--resume`` read); ``"ddp"``: Lightning's ``"ddp"``.
    """
    if name == "ddp":
        return "ddp"
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        fully_shard_blocks, data_parallel_size=world_size, tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )


def applied(run: _Run, model: nn.Module | None, optimizers: Sequence[Any]) -> str:
    """One line: what the lowprec section did to this run (format and layers, optimizer,
    sampling, multipliers, clipping, monitor)."""
    options = run.options
    modules = list(model.named_modules()) if model is not None else []
    linears = [name for name, m in modules if isinstance(m, nn.Linear)]
    quantized = [name for name, m in modules if isinstance(m, QuantizedLinear)]
    if options.fmt is None:
        parts = [f"no quantization (fmt null; {len(linears)} Linear layers at the run's precision)"]
    else:
        passes = "forward and backward" if options.quantize_backward else "forward"
        kept = sorted(set(linears) - set(quantized))
        rule = "" if options.scale_rule == "floor" else f", {options.scale_rule} scales"
        parts = [f"{options.fmt} {passes} matmuls in {len(quantized)} of {len(linears)} Linear "
                 f"layers (rounding {options.rounding}{rule}; kept: {', '.join(kept) or 'none'})"]
    for optimizer in optimizers:
        lr = optimizer.defaults.get("lr")
        source = "lowprec.optimizer, named groups" if options.optimizer else "litgpt's --optimizer"
        names = [g.get("name") for g in optimizer.param_groups if g.get("name")]
        groups = f": {', '.join(names)}" if names else ""
        parts.append(f"optimizer {type(optimizer).__name__} lr {lr} ({source}{groups})")
        if hasattr(optimizer, "sample_"):
            parts.append("posterior sampling" if options.sample else "no sampling (point estimate)")
    if options.multipliers is not None and model is not None:
        count = sum(1 for p in model.parameters() if is_multiplier(p))
        parts.append(f"multipliers {options.multipliers} ({count} tensors)")
    max_norm = options.max_norm
    if max_norm is None and run.command == "pretrain":
        max_norm = (run.config.get("train") or {}).get("max_norm")
    parts.append(f"clipping max_norm {max_norm} (multipliers excluded)" if max_norm is not None
                 else "no clipping")
    monitor = options.monitor
    parts.append("no monitor" if monitor is None else
                 f"NormMonitor every {monitor.get('every_n_steps', 50)} steps")
    fabric = run.fabric
    if fabric is not None and fabric.world_size > 1:
        parts.append(f"strategy {type(fabric.strategy).__name__} ({run.options.strategy}, "
                     f"{fabric.world_size} processes)")
    return "lowprec: " + " | ".join(parts)


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


def _world_size(config: Any) -> int:
    """The run's processes: litgpt's ``--devices`` (``"auto"``: the GPUs) times ``--num_nodes``."""
    from litgpt.utils import parse_devices

    return parse_devices(config.get("devices", 1)) * config.get("num_nodes", 1)


def _accumulation(config: Any) -> int:
    """litgpt's gradient-accumulation iterations per optimizer step (per device)."""
    train = config.get("train")
    if train is None or not train.get("micro_batch_size") or not train.get("global_batch_size"):
        return 1
    return max(1, train.global_batch_size // _world_size(config) // train.micro_batch_size)


def _total_steps(config: Any) -> int | None:
    """The run's optimizer steps when litgpt's arguments fix them: ``--train.max_steps``, or
    for ``pretrain`` ``--train.max_tokens`` (litgpt's own arithmetic: the tokens are split
    over the devices)."""
    train = config.get("train")
    if train is None:
        return None
    if train.get("max_steps"):
        return int(train.max_steps)
    micro, seq = train.get("micro_batch_size"), train.get("max_seq_length")
    if train.get("max_tokens") and micro and seq and train.get("global_batch_size"):
        per_device = train.max_tokens // _world_size(config)
        return (per_device // (micro * seq)) // _accumulation(config)
    return None
