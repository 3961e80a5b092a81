"""The one place that touches litgpt's internals: which names of its recipe modules we replace.

``lowprec-litgpt`` runs litgpt's own ``setup``/``main``/``fit`` code. litgpt offers no hook for
a precision plugin, callbacks, a named-parameter optimizer or clipping in fine-tuning, so for the
duration of a run these module-level names of the recipe module are replaced (and put back
afterwards, also after an exception):

* ``L`` — the ``lightning`` module as the recipe sees it; only its ``Fabric`` differs (ours adds
  the plugin, the callbacks, multipliers and clipping).
* ``instantiate_torch_optimizer`` — builds the ``lowprec.optimizer`` on named parameter groups.
* ``save_hyperparameters`` — litgpt's re-parses ``sys.argv``, which is wrong whenever litgpt's
  CLI is not the process's entry point; ours saves the configuration the run was parsed from.
* ``torch`` (``pretrain`` only) — its ``compile`` may be switched off (``lowprec.compile``).
* ``load_checkpoint`` (``finetune_*``) — litgpt's FSDP2 branch renames every key as for a
  LoRA model (``.weight`` -> ``.linear.weight``), so a full fine-tune on several devices could
  not load its base checkpoint; ours loads the full state dict into the shards.

:func:`check_litgpt` verifies the installed litgpt against :data:`SUPPORTED_LITGPT` and that the
recipe modules still have these names and call them; the test suite runs it, so a litgpt
release that moves its internals fails loudly instead of silently training without the plugin.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

import lightning
import torch
from packaging.specifiers import SpecifierSet

__all__ = ["COMMANDS", "SUPPORTED_LITGPT", "check_litgpt", "patched", "recipe_module"]

SUPPORTED_LITGPT = ">=0.5.13,<0.6"
"""litgpt versions whose recipe internals this module was written and tested against."""

COMMANDS: dict[str, str] = {
    "finetune_full": "litgpt.finetune.full",
    "finetune_lora": "litgpt.finetune.lora",
    "pretrain": "litgpt.pretrain",
}
"""The litgpt commands ``lowprec-litgpt`` runs, and the module holding each one's ``setup``."""

_CALLS = {
    "L": "L.Fabric(",
    "instantiate_torch_optimizer": "instantiate_torch_optimizer(",
    "save_hyperparameters": "save_hyperparameters(setup,",
    "torch": "torch.compile(model)",
    "load_checkpoint": "load_checkpoint(fabric,",
}
"""What each replaced name must still be used for in the recipe's source (see check_litgpt)."""


def recipe_module(command: str) -> types.ModuleType:
    """The litgpt module that runs ``command``.

    Raises:
        ValueError: an unknown command (the message lists the supported ones).
    """
    if command not in COMMANDS:
        raise ValueError(
            f"Unknown command {command!r}. lowprec-litgpt runs: {', '.join(COMMANDS)}."
        )
    return importlib.import_module(COMMANDS[command])


def check_litgpt(command: str) -> None:
    """Fail before training if the installed litgpt is not one this runner can patch.

    Raises:
        RuntimeError: litgpt's version is outside :data:`SUPPORTED_LITGPT`, or its recipe
            module no longer defines or uses a name that :func:`patched` replaces.
    """
    installed = version("litgpt")
    if installed not in SpecifierSet(SUPPORTED_LITGPT):
        raise RuntimeError(
            f"lowprec-litgpt supports litgpt{SUPPORTED_LITGPT}; litgpt {installed} is installed. "
            f"Install a supported version: pip install 'litgpt{SUPPORTED_LITGPT}'."
        )
    module = recipe_module(command)
    source = inspect.getsource(module)
    for name in _replaced_names(command):
        if not hasattr(module, name) or _CALLS[name] not in source:
            raise RuntimeError(
                f"litgpt {installed}: {module.__name__} no longer uses {name!r} as "
                f"lowprec-litgpt expects (looked for {_CALLS[name]!r}); the runner cannot add "
                "its plugin there. Please report this with your litgpt version."
            )


@contextmanager
def patched(
    command: str,
    *,
    fabric: Callable[..., lightning.Fabric],
    instantiate_optimizer: Callable[..., torch.optim.Optimizer],
    save_hyperparameters: Callable[..., None],
    compile_model: bool,
    load_checkpoint: Callable[..., None],
) -> Iterator[types.ModuleType]:
    """Replace the recipe module's names for the duration of the block; yield the module.

    Args:
        command: a key of :data:`COMMANDS`.
        fabric: called instead of ``lightning.Fabric(...)`` with litgpt's arguments.
        instantiate_optimizer: called instead of litgpt's ``instantiate_torch_optimizer``
            with the same arguments ``(optimizer, model_parameters, **kwargs)``.
        save_hyperparameters: called instead of litgpt's ``(function, checkpoint_dir)``.
        compile_model: ``pretrain`` only: whether ``torch.compile(model)`` compiles.
        load_checkpoint: ``finetune_*`` only: called instead of litgpt's
            ``load_checkpoint(fabric, model, checkpoint_path, strict=...)``.
    """
    check_litgpt(command)
    module = recipe_module(command)
    replacements: dict[str, Any] = {
        "L": _Module(lightning, Fabric=fabric),
        "instantiate_torch_optimizer": instantiate_optimizer,
        "save_hyperparameters": save_hyperparameters,
    }
    if "torch" in _replaced_names(command) and not compile_model:
        replacements["torch"] = _Module(torch, compile=_no_compile)
    if "load_checkpoint" in _replaced_names(command):
        replacements["load_checkpoint"] = load_checkpoint
    originals = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield module
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def _replaced_names(command: str) -> tuple[str, ...]:
    common = ("L", "instantiate_torch_optimizer", "save_hyperparameters")
    return (*common, "torch") if command == "pretrain" else (*common, "load_checkpoint")


def _no_compile(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.compile`` switched off: the model as it is."""
    return model


class _Module(types.ModuleType):
    """A stand-in for a module: the given attributes, everything else from the real one."""

    def __init__(self, real: types.ModuleType, **overrides: Any) -> None:
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
