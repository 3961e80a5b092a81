"""Which parameters go to which rule: matrices, norms and biases, embeddings, multipliers.

``param_groups(model)`` returns the usual split as torch parameter groups, for any optimizer:

* ``"matrices"``: every other parameter with 2 or more dims (attention, MLP, LM head);
  ``weight_decay``, and the optimizer's own rule (LMD, Madam, M+Adam's both branches).
* ``"norms_biases"``: 1-D and 0-dim parameters; no weight decay.
* ``"embeddings"``: the weights of ``nn.Embedding`` modules; ``embedding_weight_decay``.
* ``"multipliers"``: learnable multipliers (arXiv 2601.04890), weight decay 2e-3: the scale
  symmetries they introduce make them drift and blow up in BF16 without it; and their own
  learning rate ``multiplier_lr_ratio * lr`` (the paper gives no ratio: the default 1.0 is a
  choice, not a finding).

Groups named in ``adamw`` carry ``"adamw": "always"``, which LMD, Madam and M+Adam read as
"use the AdamW rule here" (RESEARCH.md: biases, norms and embeddings on AdamW is the sound
default for a multiplicative optimizer) and other optimizers ignore.

Multipliers are recognised by the attribute :data:`MULTIPLIER_ATTR` that
``lightning_lowprec.multipliers`` sets on them, not by name: a name test would also catch
unrelated parameters that happen to contain "multiplier", and the attribute survives renames
and wrapping; mark your own with :func:`mark_multiplier`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "GROUP_NAMES", "MULTIPLIER_ATTR", "is_multiplier", "mark_multiplier", "param_groups",
    "without_multipliers",
]

MULTIPLIER_ATTR = "_lowprec_multiplier"
"""Name of the attribute (set to ``True``) that marks a parameter as a learnable multiplier."""
GROUP_NAMES: tuple[str, ...] = ("matrices", "norms_biases", "embeddings", "multipliers")


class _MultiplierParameter(nn.Parameter):
    """The class :func:`mark_multiplier` gives a plain ``nn.Parameter``: ``copy.deepcopy`` of a
    Parameter copies its data and class but not its attributes, and Lightning's
    ``StochasticWeightAveraging`` or an EMA callback deep-copy the model."""


def is_multiplier(p: Tensor) -> bool:
    """Whether ``p`` is marked as a learnable multiplier."""
    return isinstance(p, _MultiplierParameter) or bool(getattr(p, MULTIPLIER_ATTR, False))


def without_multipliers(params: Iterable[Tensor]) -> list[Tensor]:
    """``params`` without the learnable multipliers: what gradient clipping clips."""
    return [p for p in params if not is_multiplier(p)]


def mark_multiplier(p: nn.Parameter) -> nn.Parameter:
    """Mark ``p`` as a learnable multiplier (returns it, for use in ``__init__``).

    The mark is an attribute (kept by pickling, e.g. ``torch.save`` of a whole module) and,
    for a plain ``nn.Parameter``, its class (kept by ``copy.deepcopy``).
    """
    setattr(p, MULTIPLIER_ATTR, True)
    if type(p) is nn.Parameter:
        p.__class__ = _MultiplierParameter
    return p


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.1,
    *,
    embedding_weight_decay: float | None = None,
    multiplier_weight_decay: float = 2e-3,
    lr: float | None = None,
    multiplier_lr_ratio: float = 1.0,
    adamw: Iterable[str] = ("norms_biases", "embeddings", "multipliers"),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into named groups (see module doc).

    Each trainable parameter appears once (a tied weight goes to the first group that claims
    it in the order multipliers, embeddings, norms/biases, matrices); frozen parameters are
    left out; empty groups are omitted.

    Args:
        model: any module.
        weight_decay: decay of the matrices (for LMD, its log-space ``lambda``).
        embedding_weight_decay: decay of the embeddings; ``None`` means ``weight_decay``.
        multiplier_weight_decay: decay of the learnable multipliers.
        lr: the base learning rate; when given, every group carries ``"lr"`` (otherwise the
            groups take the optimizer's default ``lr``).
        multiplier_lr_ratio: the multipliers' learning rate as a multiple of ``lr``; a ratio
            other than 1.0 needs ``lr``.
        adamw: names of the groups that get ``"adamw": "always"``; ``()`` for none.

    Raises:
        ValueError: a name in ``adamw`` is not one of :data:`GROUP_NAMES`; a non-positive
            ``lr`` or ``multiplier_lr_ratio``; a ratio other than 1.0 without ``lr``.
    """
    adamw = tuple(adamw)
    unknown = [n for n in adamw if n not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"Invalid adamw: {unknown!r}; expected names from {GROUP_NAMES}.")
    if lr is not None and not lr > 0:
        raise ValueError(f"Invalid lr: {lr!r}; expected lr > 0.")
    if not multiplier_lr_ratio > 0:
        raise ValueError(
            f"Invalid multiplier_lr_ratio: {multiplier_lr_ratio!r}; expected a ratio > 0."
        )
    if lr is None and multiplier_lr_ratio != 1.0:
        raise ValueError(
            f"multiplier_lr_ratio={multiplier_lr_ratio!r} needs the base lr: pass lr=... too."
        )
    from lightning_lowprec.fsdp import mark_sharded_multipliers

    # The mark can be gone under FSDP2 (the Trainer's ``model.to(device)`` after sharding).
    mark_sharded_multipliers(model)
    embedding_ids = {
        id(_stored_weight(m)) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    buckets: dict[str, list[Tensor]] = {name: [] for name in GROUP_NAMES}
    for p in model.parameters():  # yields a tied parameter once
        if not p.requires_grad:
            continue
        if is_multiplier(p):
            buckets["multipliers"].append(p)
        elif id(p) in embedding_ids:
            buckets["embeddings"].append(p)
        elif p.ndim < 2:
            buckets["norms_biases"].append(p)
        else:
            buckets["matrices"].append(p)
    decay = {
        "matrices": weight_decay,
        "norms_biases": 0.0,
        "embeddings": weight_decay if embedding_weight_decay is None else embedding_weight_decay,
        "multipliers": multiplier_weight_decay,
    }
    groups = []
    for name in GROUP_NAMES:
        if buckets[name]:
            group: dict[str, Any] = {
                "params": buckets[name], "name": name, "weight_decay": decay[name],
            }
            if lr is not None:
                group["lr"] = lr * multiplier_lr_ratio if name == "multipliers" else lr
            if name in adamw:
                group["adamw"] = "always"
            groups.append(group)
    return groups


def _stored_weight(module: nn.Module) -> Tensor:
    """The weight Parameter a module stores: with multipliers (a parametrization),
    ``module.weight`` is recomputed on every access and the Parameter is the original."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
