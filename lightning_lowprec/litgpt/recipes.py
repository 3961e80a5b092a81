"""The recipes shipped with the package (``lightning_lowprec/recipes/*.yaml``), by name.

A recipe is a LitGPT config file with a ``lowprec:`` section (see
:mod:`lightning_lowprec.litgpt.options`), set up for a real model: a ~1B pretrained checkpoint for
the ``finetune_*`` recipes, a pythia-160m from scratch for ``pretrain-*``. The overrides
``tiny-finetune`` and ``tiny-pretrain``, given after a recipe, turn it into a CPU smoke run on the
built-in default (:func:`~lightning_lowprec.litgpt.checkpoint.make_default`); the learning rates
measured there are :data:`TINY_LR` (:func:`tiny_overrides` gives both; the demo and tests use it).

``--config NAME`` accepts a file path or the name of a shipped recipe (with or without
``.yaml``), so that an installed package runs them without a clone of the repository;
``lowprec-litgpt recipes`` lists them and ``lowprec-litgpt recipes NAME`` prints one (to copy
and edit).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "RECIPES_DIR", "TINY_LR", "recipe_names", "recipe_path", "recipe_summary", "tiny_overrides",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""Where the shipped recipes are (package data)."""
TINY_LR: dict[str, float] = {
    "finetune_full-adamw": 5e-3,
    "finetune_full-lmd-mxfp6": 0.03,
    "finetune_lora-adamw": 2e-3,
    "finetune_lora-mplusadam-bf16": 2e-3,
    "pretrain-adamw": 2e-3,
    "pretrain-lmd-mxfp4-multipliers": 0.01,
}
"""Each recipe's learning rate on the built-in default (a random-init 14M model: larger steps
than a pretrained model takes), measured by 60-step sweeps recorded in the recipes' comments."""


def tiny_overrides(recipe: str) -> list[str]:
    """The arguments that make ``recipe`` a smoke run on the built-in default (give them after
    ``--config recipe``): the ``tiny-*`` override and the recipe's :data:`TINY_LR`."""
    command = recipe.split("-")[0]
    override = "tiny-pretrain" if command == "pretrain" else "tiny-finetune"
    return ["--config", override, "--lowprec.optimizer.init_args.lr", str(TINY_LR[recipe])]


def recipe_names() -> list[str]:
    """The shipped recipes' names (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """An existing config file, or the shipped recipe of that name.

    Raises:
        ValueError: neither a file nor a shipped recipe (the message lists the recipes).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ValueError(
        f"--config {str(name_or_path)!r}: no such file, and not a shipped recipe. Shipped "
        f"recipes: {', '.join(recipe_names())} (lowprec-litgpt recipes)."
    )


def recipe_summary(name: str) -> str:
    """The first sentence of a shipped recipe's leading comment: what it is."""
    lines = []
    for line in recipe_path(name).read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        lines.append(text)
    summary = " ".join(lines)
    return re.split(r"(?<=[.:])\s", summary, maxsplit=1)[0].rstrip(".:")
