"""Which multipliers a layer gets, and the model-specific placements that say so.

The types :func:`~lightning_lowprec.multipliers.add_multipliers` and the placement presets share,
in a module of their own so that a preset (``lightning_lowprec.litgpt.placement``) needs nothing
of :mod:`~lightning_lowprec.multipliers` and the generic module imports no preset: a preset
*registers* itself (:func:`register_placement`), and ``add_multipliers`` asks the registered
presets (:func:`registered_placement`) before it falls back to its generic rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "KINDS",
    "NONE",
    "PLACEMENTS",
    "ROW",
    "ROW_COLUMN",
    "SCALAR",
    "MultiplierSpec",
    "PlacementPreset",
    "register_placement",
    "registered_placement",
]

KINDS: tuple[str, ...] = ("row", "column", "scalar")
"""The multiplier kinds a placement can ask for, in the order they are written."""
PLACEMENTS: tuple[str, ...] = ("paper", "symmetry_free", "scalar")
"""The named placements :func:`~lightning_lowprec.multipliers.add_multipliers` knows."""


@dataclass(frozen=True)
class MultiplierSpec:
    """Which multipliers one layer gets.

    Attributes:
        row: ``True`` for one factor per row (a Linear's output feature, an Embedding's token);
            a positive int ``n`` for the leading ``n`` rows only, the others fixed at 1 (the
            query block of a fused QKV projection, which litgpt lays out first).
        column: one factor per column (a Linear's input feature, an Embedding's dimension).
        scalar: one factor for the whole matrix.
    """

    row: bool | int = False
    column: bool = False
    scalar: bool = False

    def __post_init__(self) -> None:
        for name in ("column", "scalar"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MultiplierSpec.{name} must be True or False.")
        if not isinstance(self.row, bool) and not (isinstance(self.row, int) and self.row > 0):
            raise ValueError(
                f"MultiplierSpec.row must be True, False or a positive number of leading rows, "
                f"got {self.row!r}."
            )

    @classmethod
    def parse(cls, value: str | Sequence[str] | MultiplierSpec) -> MultiplierSpec:
        """Read ``"row+column"``, ``("row", "column")``, ``"none"`` or a spec.

        Raises:
            ValueError: an unknown or repeated kind (the message lists :data:`KINDS`).
        """
        if isinstance(value, MultiplierSpec):
            return value
        if isinstance(value, str):
            kinds = [] if value == "none" else value.split("+")
        else:
            kinds = list(value)
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"Invalid multipliers {value!r}: expected kinds from {', '.join(KINDS)} joined "
                "by '+' (e.g. 'row+column'), a sequence of them, 'none', or a MultiplierSpec."
            )
        return cls(row="row" in kinds, column="column" in kinds, scalar="scalar" in kinds)

    def __bool__(self) -> bool:
        return bool(self.row or self.column or self.scalar)

    def __str__(self) -> str:
        kinds = []
        if self.row:
            kinds.append("row" if self.row is True else f"row[:{self.row}]")
        kinds += [kind for kind in ("column", "scalar") if getattr(self, kind)]
        return "+".join(kinds) or "none"


ROW_COLUMN = MultiplierSpec(row=True, column=True)
ROW = MultiplierSpec(row=True)
SCALAR = MultiplierSpec(scalar=True)
NONE = MultiplierSpec()

PlacementPreset = Callable[[nn.Module, str], "dict[str, MultiplierSpec] | None"]
"""``preset(model, placement)``: qualified layer name -> spec for the models the preset knows
(layers that get none included, with an empty spec), ``None`` for a model it does not know."""

_PRESETS: list[PlacementPreset] = []


def register_placement(preset: PlacementPreset) -> PlacementPreset:
    """Let ``add_multipliers`` ask ``preset`` for the named placements (idempotent); returns it,
    so it can decorate the preset."""
    if preset not in _PRESETS:
        _PRESETS.append(preset)
    return preset


def registered_placement(model: nn.Module, placement: str) -> dict[str, MultiplierSpec] | None:
    """The first registered preset's answer for ``model``, ``None`` if no preset knows it."""
    for preset in _PRESETS:
        targets = preset(model, placement)
        if targets is not None:
            return targets
    return None
