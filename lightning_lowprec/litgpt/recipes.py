"""The recipes shipped with the package (``lightning_lowprec/recipes/*.yaml``), by name.

A recipe is a LitGPT config file with a ``lowprec:`` section (see
:mod:`lightning_lowprec.litgpt.options`). ``--config NAME`` accepts a file path or the name of a
shipped recipe (with or without ``.yaml``), so that an installed package runs them without a
clone of the repository; ``lowprec-litgpt recipes`` lists them and ``lowprec-litgpt recipes
NAME`` prints one (to copy and edit).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPES_DIR", "recipe_names", "recipe_path", "recipe_summary"]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""Where the shipped recipes are (package data)."""


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
    """The first comment line of a shipped recipe: what it is."""
    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
