"""Where learnable multipliers go in a litgpt ``GPT`` (arXiv 2601.04890's placements).

:func:`~lightning_lowprec.multipliers.add_multipliers` asks :func:`litgpt_placement` (registered
as a placement preset, :mod:`~lightning_lowprec.multiplier_spec`) for the named placements;
it answers for every module that holds a litgpt ``GPT``. The layers are found by litgpt's
classes, not by names, so every architecture litgpt builds from these blocks is covered:

=============================  ===========  ===============  ========
layer                          paper        symmetry_free    scalar
=============================  ===========  ===============  ========
``transformer.wte``            row+column   row+column       scalar
``attn.qkv`` (fused Q, K, V)   row+column   query rows only  scalar
``attn.proj``                  row+column   row+column       scalar
``mlp.fc`` (GPT-NeoX, Pythia)  row+column   row              scalar
``mlp.fc_1`` (gate)            row+column   row              scalar
``mlp.fc_2`` (up)              row+column   none             scalar
``mlp.proj`` (down)            row+column   row+column       scalar
``lm_head``                    none         none             none
=============================  ===========  ===============  ========

Why: the paper puts row and column multipliers on every matrix but the LM head (row multipliers
there hurt). Its symmetry-free variant drops the multipliers that a forward-pass symmetry makes
redundant: keys against queries (``q·k`` is unchanged when a query row and the matching key row
are scaled inversely), values against ``attn.proj``'s columns, and the up projection against
the down projection's columns (``act(gate)·up`` is linear in ``up``). The gate keeps its rows,
its activation is not scale-equivariant; a non-gated MLP's ``fc`` is treated as a gate. The
paper does not list the embedding for that variant; it keeps row+column here as in ``"paper"``.

litgpt lays the fused QKV out as all query rows, then keys, then values, so "query rows" is a
row multiplier over the leading ``n_head · head_size`` rows. Mixture-of-experts MLPs are covered
expert by expert; their router and multi-head-latent-attention layers get nothing.
"""

from __future__ import annotations

import sys

from torch import nn

from lightning_lowprec.multiplier_spec import (
    NONE,
    PLACEMENTS,
    ROW,
    ROW_COLUMN,
    SCALAR,
    MultiplierSpec,
    register_placement,
)

__all__ = ["litgpt_placement"]


@register_placement
def litgpt_placement(model: nn.Module, placement: str) -> dict[str, MultiplierSpec] | None:
    """The layers of every litgpt ``GPT`` inside ``model`` and their multipliers.

    Args:
        model: a module that is or contains litgpt ``GPT`` models; names are relative to it.
        placement: ``"paper"``, ``"symmetry_free"`` or ``"scalar"`` (see the module doc).

    Returns:
        Qualified layer name -> spec, including layers that get none (an empty spec);
        ``None`` when ``model`` holds no litgpt ``GPT`` (another preset or the generic rule
        applies).

    Raises:
        ValueError: an unknown placement name.
    """
    # A litgpt GPT exists only if litgpt.model was imported: checking sys.modules keeps litgpt
    # an optional dependency and spares other users its import time.
    litgpt_model = sys.modules.get("litgpt.model")
    if litgpt_model is None or not any(isinstance(m, litgpt_model.GPT) for m in model.modules()):
        return None
    from litgpt.model import GPT, CausalSelfAttention, GptNeoxMLP, LLaMAMLP

    if placement not in PLACEMENTS:
        raise ValueError(
            f"Unknown placement {placement!r}. Valid placements: {', '.join(PLACEMENTS)}."
        )
    targets: dict[str, MultiplierSpec] = {}
    for name, module in model.named_modules():
        if isinstance(module, GPT):
            symmetry_free = {"transformer.wte": ROW_COLUMN}
        elif isinstance(module, CausalSelfAttention):
            query_rows = module.config.n_head * module.config.head_size
            symmetry_free = {"qkv": MultiplierSpec(row=query_rows), "proj": ROW_COLUMN}
        elif isinstance(module, GptNeoxMLP):
            symmetry_free = {"fc": ROW, "proj": ROW_COLUMN}
        elif isinstance(module, LLaMAMLP):  # GemmaMLP and MoE experts too
            symmetry_free = {"fc_1": ROW, "fc_2": NONE, "proj": ROW_COLUMN}
        else:
            continue
        for child, symmetry_free_spec in symmetry_free.items():
            spec = {"paper": ROW_COLUMN, "scalar": SCALAR}.get(placement, symmetry_free_spec)
            targets[f"{name}.{child}" if name else child] = spec
    return targets
