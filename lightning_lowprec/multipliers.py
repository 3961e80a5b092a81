"""Learnable multipliers (arXiv 2601.04890): free the scale of matrix layers from weight decay.

Weight decay holds each weight matrix at a noise-vs-decay equilibrium norm that the data never
chose. The paper re-parameterises a matrix layer as

    W_eff = s · diag(r) · W · diag(c)        (W_eff[i, j] = s · r[i] · W[i, j] · c[j])

with a learnable scalar ``s``, a row vector ``r`` (one factor per output row of a Linear, per
token of an Embedding) and a column vector ``c`` (per input feature / embedding dimension), all
initialised to 1. ``W`` keeps its own weight decay; the multipliers get a small one (2e-3,
:func:`lightning_lowprec.optim.param_groups` does it) and must be left out of gradient clipping
(the plugin does it; :mod:`lightning_lowprec.callbacks` has a callback for everyone else).

How: :func:`add_multipliers` registers a :class:`Multipliers` module as a torch
parametrization of the layer's ``weight``. Every read of ``layer.weight`` then returns
``W_eff``, so ``nn.Linear``, ``nn.Embedding`` and
:class:`~lightning_lowprec.nn.QuantizedLinear` use the effective weight unchanged — a quantized
layer quantizes ``W_eff``, the very numbers the merged model will hold. Autograd gives the
paper's eq. 4 gradients; the cost is two element-wise passes over ``W`` per forward and per
backward, small next to the matmul.

The parametrization moves the stored weight to ``<layer>.parametrizations.weight.original`` and
adds ``<layer>.parametrizations.weight.0.{row,column,scalar}_multiplier``. These key names are
how the pure state-dict functions below recognise multiplied layers:

* :func:`merged_state_dict` folds them into ``<layer>.weight``: the unmodified model class loads
  the result with ``strict=True``.
* :func:`split_state_dict` also returns the *factors*: the multipliers and whatever else is
  needed to get the raw weight back bit for bit from ``W_eff``; :func:`unmerged_state_dict`
  inverts it exactly. Division is not exact, so the factors hold, per weight, the integer
  difference in units in the last place between ``W`` and ``W_eff / (s·r·c)`` as int8 — a
  quarter of an fp32 weight's size, a half of a bf16 one's — or, where that does not fit in
  int8 (a multiplier at 0, an overflow), the raw weight itself.
* :func:`merge_multipliers` folds them in place and gives the plain layers back.

A multiplied layer also loads a merged (plain) state dict: ``W`` takes ``W_eff`` and the
multipliers restart at 1, which computes the same function. So a LightningModule that calls
``add_multipliers`` in ``__init__`` still loads its merged checkpoints, and pretrained plain
weights load after ``add_multipliers`` as well as before.

Limits: torch cannot pickle parametrized modules (``torch.save(model)``, ``ddp_spawn`` with the
``spawn`` start method); use state dicts and ``ddp``. Tied weights are refused. Multipliers must
be the only parametrization of a weight, or the state dict alone would not define ``W_eff``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_lowprec.multiplier_spec import (
    KINDS,
    PLACEMENTS,
    ROW_COLUMN,
    SCALAR,
    MultiplierSpec,
    registered_placement,
)
from lightning_lowprec.nn import DEFAULT_EXCLUDE, _listing, _matches
from lightning_lowprec.optim.groups import mark_multiplier

__all__ = [
    "KINDS",
    "PLACEMENTS",
    "MultiplierSpec",
    "Multipliers",
    "add_multipliers",
    "effective_weight",
    "merge_multipliers",
    "merged_state_dict",
    "restarted_state_dict",
    "split_state_dict",
    "unmerged_state_dict",
]

_ORIGINAL = "parametrizations.weight.original"
_FACTOR = "parametrizations.weight.0."
_PARAMETER_NAMES = {kind: f"{kind}_multiplier" for kind in KINDS}
_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT8 = torch.iinfo(torch.int8)
_MATRIX_LAYERS = (nn.Linear, nn.Embedding)




class Multipliers(nn.Module):
    """The parametrization ``W -> s · diag(r) · W · diag(c)`` of one layer's weight.

    Registered by :func:`add_multipliers`, not by hand. Its parameters are the multipliers,
    marked with :func:`~lightning_lowprec.optim.mark_multiplier`, in the weight's dtype and
    device; absent kinds are ``None`` and cost nothing.

    Args:
        weight: the 2-D weight being multiplied (for shape, dtype and device).
        spec: which multipliers.
        init: the initial value of every multiplier.
    """

    def __init__(self, weight: Tensor, spec: MultiplierSpec, init: float = 1.0) -> None:
        super().__init__()
        rows, columns = weight.shape
        sizes = {
            "row": None if not spec.row else (rows if spec.row is True else spec.row,),
            "column": (columns,) if spec.column else None,
            "scalar": () if spec.scalar else None,
        }
        for kind, size in sizes.items():
            value = None
            if size is not None:
                data = torch.full(size, init, dtype=weight.dtype, device=weight.device)
                value = mark_multiplier(nn.Parameter(data))
            self.register_parameter(_PARAMETER_NAMES[kind], value)

    def forward(self, weight: Tensor) -> Tensor:
        return effective_weight(
            weight, self.row_multiplier, self.column_multiplier, self.scalar_multiplier
        )

    def extra_repr(self) -> str:
        shapes = [
            f"{kind}={tuple(p.shape)}"
            for kind in KINDS
            if (p := getattr(self, _PARAMETER_NAMES[kind])) is not None
        ]
        return ", ".join(shapes)


def effective_weight(
    weight: Tensor,
    row: Tensor | None = None,
    column: Tensor | None = None,
    scalar: Tensor | None = None,
) -> Tensor:
    """``W_eff = s · diag(r) · W · diag(c)``, the one computation forward and merging share.

    ``s·r`` is formed first (a vector op), then ``W`` is multiplied by it and by ``c``: two
    passes over ``W``. A ``row`` shorter than ``W`` scales the leading rows only. Because the
    forward and every merge call this function, a merged weight equals the weight the
    multiplied layer computed with, bit for bit.
    """
    row_factor = _row_factor(weight.shape[0], row, scalar)
    if row_factor is not None:
        weight = weight * row_factor
    if column is not None:
        weight = weight * column
    return weight


def add_multipliers(
    module: nn.Module,
    placement: str | Mapping[str, str | Sequence[str] | MultiplierSpec] = "paper",
    init: float = 1.0,
) -> dict[str, MultiplierSpec]:
    """Attach learnable multipliers to the matrix layers of ``module``, in place.

    Placements:

    * ``"paper"``: row and column multipliers on every matrix layer except the LM head — for a
      litgpt ``GPT``: the embedding ``transformer.wte``, the fused ``attn.qkv``, ``attn.proj``
      and the MLP's ``fc``/``proj`` or ``fc_1``/``fc_2``/``proj`` (MoE experts included; the
      router and multi-head-latent-attention layers are left alone); for any other model: every
      ``nn.Linear`` and ``nn.Embedding`` not named ``lm_head``.
    * ``"scalar"``: one scalar multiplier on each of those layers.
    * ``"symmetry_free"`` (litgpt ``GPT`` only; it must know which layer is which): the paper's
      placement without forward-pass symmetries — query rows of ``attn.qkv`` (keys and values
      none), ``attn.proj`` row+column, MLP gate ``fc_1`` row, up ``fc_2`` none, down ``proj``
      row+column (a non-gated MLP's ``fc`` gets row, as a gate), embedding row+column. The
      paper found it slightly worse than ``"paper"``.
    * a mapping from module-name patterns to multipliers (``"row+column"``, ``("row",)``,
      ``"scalar"``, a :class:`MultiplierSpec`): the pattern rule is
      :func:`~lightning_lowprec.nn.quantize_linears`' (``fnmatch`` globs over qualified names
      that also match trailing dotted components and containing modules, so ``"attn.qkv"``
      selects every block's QKV and ``"transformer.h.0"`` every matrix layer of block 0).

    The forward computes the same function as before when ``init`` is 1 (the paper's choice);
    any other ``init`` scales each layer by ``init`` per multiplier kind.

    Call it before building the optimizer and before ``Trainer``/``Fabric`` set up the model
    (the plugin's conversion keeps the multipliers). Put the multipliers in their own parameter
    group (weight decay 2e-3): :func:`lightning_lowprec.optim.param_groups` does it.

    Args:
        module: any ``nn.Module`` (a litgpt ``GPT``, a LightningModule holding one, ...).
        placement: a name from :data:`PLACEMENTS` or a mapping, see above.
        init: the initial value of every multiplier; finite and non-zero.

    Returns:
        The qualified names of the layers that got multipliers, each with its spec.

    Raises:
        ValueError: an unknown placement (the message lists the valid ones), a pattern that
            names no module or no matrix layer, patterns that disagree on a layer, a layer that
            already has multipliers or another parametrization of its weight, a tied weight, a
            row count larger than the layer, or a bad ``init``. Nothing is changed then.
    """
    if not isinstance(init, (int, float)) or not math.isfinite(init) or init == 0:
        raise ValueError(f"init must be a finite, non-zero number, got {init!r}.")
    targets = _resolve_placement(module, placement)
    layers = dict(module.named_modules())
    names_of = _parameter_names(module)
    for name, spec in targets.items():
        _check_target(name, layers[name], spec, names_of)
    for name, spec in targets.items():
        layer = layers[name]
        parametrize.register_parametrization(layer, "weight", Multipliers(layer.weight, spec, init))
        layer.register_load_state_dict_pre_hook(_load_merged)
    return targets


def merge_multipliers(module: nn.Module) -> nn.Module:
    """Fold every layer's multipliers into its weight, in place; return ``module``.

    Each layer gets its class back (``nn.Linear``, ``QuantizedLinear``, ...) and its
    ``weight`` Parameter back — the same Parameter object the multipliers wrapped, now holding
    ``W_eff``, so the state dict has the plain keys. The multiplier Parameters leave the model;
    an optimizer that still holds them should not be stepped again. A module without
    multipliers is returned unchanged.

    Raises:
        ValueError: a multiplied weight that also has another parametrization.
    """
    for name, layer in list(module.named_modules()):
        if _multipliers_of(name, layer) is None:
            continue
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        hooks = layer._load_state_dict_pre_hooks
        ours = [key for key, hook in hooks.items() if getattr(hook, "hook", None) is _load_merged]
        for key in ours:
            del hooks[key]
    return module


def merged_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """A copy of ``state_dict`` with every layer's multipliers folded into ``<layer>.weight``.

    A pure function of the state dict (it recognises multiplied layers by their key names;
    other entries pass through): the unmodified model class loads the result with
    ``strict=True`` and computes with exactly the weights the multiplied model used.

    Raises:
        ValueError: a multiplied weight with another parametrization's entries next to it.
    """
    return _merge(state_dict, keep_factors=False)[0]


def split_state_dict(
    state_dict: Mapping[str, Any],
) -> tuple[OrderedDict[str, Any], dict[str, Tensor]]:
    """``(merged, factors)``: the merged state dict and what resuming needs besides it.

    ``factors`` maps the original keys of the multiplied layers to the multipliers and, for
    each raw weight, an int8 correction in units in the last place that rebuilds it from
    ``W_eff`` exactly (a 0-dim zero when none is needed), or the raw weight itself where the
    correction would not fit in int8. :func:`unmerged_state_dict` inverts this bit for bit.
    """
    return _merge(state_dict, keep_factors=True)


def unmerged_state_dict(
    merged: Mapping[str, Any], factors: Mapping[str, Tensor]
) -> OrderedDict[str, Any]:
    """The state dict :func:`split_state_dict` split into ``merged`` and ``factors``, exactly.

    Raises:
        KeyError: ``factors`` name a layer whose merged weight is missing from ``merged``.
    """
    prefixes = [prefix for key in factors if (prefix := _original_prefix(key)) is not None]
    layers = {prefix + "weight": prefix for prefix in prefixes}
    missing = [key for key in layers if key not in merged]
    if missing:
        raise KeyError(f"The merged state dict lacks the multiplied weights {missing}.")
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in merged.items():
        if key not in layers:
            out[key] = value
            continue
        prefix = layers[key]
        multipliers = {
            kind: factors.get(prefix + _FACTOR + name) for kind, name in _PARAMETER_NAMES.items()
        }
        stored = factors[prefix + _ORIGINAL]
        if stored.is_floating_point():
            weight = stored
        else:
            recovered = _recovered_weight(value, **multipliers)
            bits = _BITS_DTYPES[recovered.element_size()]
            weight = (recovered.view(bits) + stored).view(recovered.dtype)
        out[prefix + _ORIGINAL] = weight
        for kind, name in _PARAMETER_NAMES.items():
            if multipliers[kind] is not None:
                out[prefix + _FACTOR + name] = multipliers[kind]
    _copy_metadata(merged, out)
    return out


def _merge(
    state_dict: Mapping[str, Any], keep_factors: bool
) -> tuple[OrderedDict[str, Any], dict[str, Tensor]]:
    prefixes = _multiplied_prefixes(state_dict)
    consumed = {
        prefix + _FACTOR + name for prefix in prefixes for name in _PARAMETER_NAMES.values()
    }
    merged: OrderedDict[str, Any] = OrderedDict()
    factors: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in consumed:
            continue
        prefix = _original_prefix(key)
        if prefix not in prefixes:
            merged[key] = value
            continue
        multipliers = {
            kind: state_dict.get(prefix + _FACTOR + name)
            for kind, name in _PARAMETER_NAMES.items()
        }
        with torch.no_grad():
            w_eff = effective_weight(value, **multipliers)
            merged[prefix + "weight"] = w_eff
            if keep_factors:
                factors[key] = _correction(value, w_eff, multipliers)
                for kind, name in _PARAMETER_NAMES.items():
                    if multipliers[kind] is not None:
                        factors[prefix + _FACTOR + name] = multipliers[kind]
    _copy_metadata(state_dict, merged)
    return merged, factors


def _multiplied_prefixes(state_dict: Mapping[str, Any]) -> set[str]:
    """Prefixes (``"gpt.transformer.wte."``, or ``""``) of the layers that carry multipliers."""
    prefixes = set()
    for key in state_dict:
        prefix = _original_prefix(key)
        if prefix is None:
            continue
        if not any(prefix + _FACTOR + name in state_dict for name in _PARAMETER_NAMES.values()):
            continue
        chained = prefix + "parametrizations.weight.1."
        if any(isinstance(other, str) and other.startswith(chained) for other in state_dict):
            raise ValueError(
                f"{prefix}weight has another parametrization after its multipliers; its "
                "effective weight is not defined by the state dict alone."
            )
        prefixes.add(prefix)
    return prefixes


def _original_prefix(key: Any) -> str | None:
    """``"wte."`` for ``"wte.parametrizations.weight.original"`` (``""`` at the top), else None."""
    if isinstance(key, str) and (key == _ORIGINAL or key.endswith("." + _ORIGINAL)):
        return key[: -len(_ORIGINAL)]
    return None


def _correction(weight: Tensor, w_eff: Tensor, multipliers: dict[str, Tensor | None]) -> Tensor:
    """What rebuilds ``weight`` from ``w_eff`` exactly: int8 ulp differences, or ``weight``.

    The bit patterns of two finite floats of one sign differ by their distance in ulps, and
    ``W / (s·r·c)`` has the sign of ``W``, so the integer subtraction cannot overflow.
    """
    bits = _BITS_DTYPES.get(weight.element_size())
    if bits is None or not weight.is_floating_point():
        return weight.clone()
    recovered = _recovered_weight(w_eff, **multipliers)
    if weight.numel() == 0:
        return torch.zeros((), dtype=torch.int8, device=weight.device)
    if not torch.isfinite(recovered).all():
        return weight.clone()
    difference = weight.view(bits) - recovered.view(bits)
    low, high = torch.aminmax(difference)
    if low < _INT8.min or high > _INT8.max:
        return weight.clone()
    if low == high == 0:
        return torch.zeros((), dtype=torch.int8, device=weight.device)
    return difference.to(torch.int8)


def _recovered_weight(
    w_eff: Tensor, row: Tensor | None, column: Tensor | None, scalar: Tensor | None
) -> Tensor:
    """``W_eff / diag(c) / (s·diag(r))``: the inverse of :func:`effective_weight`, to an ulp."""
    if column is not None:
        w_eff = w_eff / column
    row_factor = _row_factor(w_eff.shape[0], row, scalar)
    if row_factor is not None:
        w_eff = w_eff / row_factor
    return w_eff


def _row_factor(rows: int, row: Tensor | None, scalar: Tensor | None) -> Tensor | None:
    """``s·r`` shaped to broadcast over a weight's rows (0-dim for a lone scalar)."""
    if row is None:
        return scalar
    if row.shape[0] < rows:
        row = torch.cat([row, row.new_ones(rows - row.shape[0])])
    if scalar is not None:
        row = row * scalar
    return row.unsqueeze(-1)


def _copy_metadata(source: Mapping[str, Any], target: OrderedDict[str, Any]) -> None:
    """Keep a state dict's per-module version metadata, which ``load_state_dict`` reads."""
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        target._metadata = metadata  # type: ignore[attr-defined]


def _resolve_placement(
    module: nn.Module, placement: str | Mapping[str, str | Sequence[str] | MultiplierSpec]
) -> dict[str, MultiplierSpec]:
    """The layers a placement selects, by qualified name, with their (non-empty) specs."""
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ValueError(
                f"Unknown placement {placement!r}. Valid placements: "
                f"{', '.join(map(repr, PLACEMENTS))}, or a mapping from module-name patterns "
                "to multipliers such as {'attn.qkv': 'row+column'}."
            )
        targets = registered_placement(module, placement)
        if targets is not None:
            pass
        elif placement == "symmetry_free":
            raise ValueError(
                "placement='symmetry_free' needs a litgpt GPT: it must know which layers are "
                "the queries, the MLP gate and up projections. Pass a mapping for other models."
            )
        else:
            spec = SCALAR if placement == "scalar" else ROW_COLUMN
            targets = {
                name: spec
                for name, layer in module.named_modules()
                if isinstance(layer, _MATRIX_LAYERS) and not _matches(name, DEFAULT_EXCLUDE)
            }
        if not targets:
            raise ValueError(
                f"placement={placement!r} selects no matrix layer (nn.Linear, nn.Embedding) "
                f"of {type(module).__name__}."
            )
    elif isinstance(placement, Mapping):
        targets = _mapping_targets(module, placement)
    else:
        raise ValueError(
            f"placement must be one of {', '.join(map(repr, PLACEMENTS))} or a mapping, "
            f"got {placement!r}."
        )
    return {name: spec for name, spec in targets.items() if spec}


def _mapping_targets(
    module: nn.Module, placement: Mapping[str, str | Sequence[str] | MultiplierSpec]
) -> dict[str, MultiplierSpec]:
    named = dict(module.named_modules())
    matrices = [name for name, layer in named.items() if isinstance(layer, _MATRIX_LAYERS)]
    targets: dict[str, MultiplierSpec] = {}
    chosen_by: dict[str, str] = {}
    for pattern, value in placement.items():
        if not isinstance(pattern, str):
            raise ValueError(f"Placement keys must be module-name patterns, got {pattern!r}.")
        spec = MultiplierSpec.parse(value)
        selected = [name for name in matrices if _matches(name, (pattern,))]
        if not selected:
            hits = [name for name in named if name and _matches(name, (pattern,))]
            if hits:
                kinds = ", ".join(f"{n} ({type(named[n]).__name__})" for n in hits[:5])
                raise ValueError(
                    f"The placement pattern {pattern!r} names no matrix layer, only {kinds}; "
                    "multipliers go on nn.Linear and nn.Embedding weights."
                )
            raise ValueError(
                f"The placement pattern {pattern!r} matches no module of "
                f"{type(module).__name__}. Matrix layers: {_listing(matrices)}."
            )
        for name in selected:
            if name in targets and targets[name] != spec:
                raise ValueError(
                    f"Placement patterns {chosen_by[name]!r} ({targets[name]}) and {pattern!r} "
                    f"({spec}) disagree on {name}; make them select disjoint layers."
                )
            targets[name], chosen_by[name] = spec, pattern
    return targets


def _check_target(
    name: str, layer: nn.Module, spec: MultiplierSpec, names_of: dict[int, list[str]]
) -> None:
    shown = name or "the module itself"
    if not isinstance(layer, _MATRIX_LAYERS):
        raise ValueError(
            f"{shown} is a {type(layer).__name__}, not a matrix layer (nn.Linear, nn.Embedding)."
        )
    if parametrize.is_parametrized(layer, "weight"):
        if _multipliers_of(name, layer) is not None:
            raise ValueError(f"{shown} already has multipliers; merge_multipliers() removes them.")
        raise ValueError(
            f"The weight of {shown} already has a parametrization; multipliers must be the "
            "only one, or a state dict alone would not define the effective weight."
        )
    tied = names_of.get(id(layer.weight), [])
    if len(tied) > 1:
        raise ValueError(
            f"The weight of {shown} is tied ({', '.join(tied)}); multipliers on a shared "
            "weight would change the other layers too. Untie it first."
        )
    rows = layer.weight.shape[0]
    if spec.row is not True and spec.row and spec.row > rows:
        raise ValueError(f"{shown} has {rows} rows; a row multiplier for {spec.row} was asked.")


def _multipliers_of(name: str, layer: nn.Module) -> Multipliers | None:
    """The layer's multipliers; ``None`` if it has none.

    Raises:
        ValueError: the multipliers share the weight with another parametrization.
    """
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    chain = layer.parametrizations.weight
    found = [p for p in chain if isinstance(p, Multipliers)]
    if not found:
        return None
    if len(chain) > 1:
        raise ValueError(
            f"The weight of {name or 'the module'} has another parametrization beside its "
            "multipliers; remove it before merging."
        )
    return found[0]


def _load_merged(layer: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: read a merged ``<layer>.weight`` as ``W = W_eff``, multipliers 1.

    Leaves the state dict alone when it has the multiplied layout already.
    """
    multipliers = _multipliers_of(prefix.rstrip("."), layer)
    if multipliers is not None:
        _restart(state_dict, prefix, multipliers)


def restarted_state_dict(state_dict: Mapping[str, Any], module: nn.Module) -> dict[str, Any]:
    """A copy of a plain (or merged) ``state_dict`` in the key layout of ``module`` with
    multipliers: each multiplied layer's ``weight`` becomes its raw weight, its multipliers 1
    (full shapes) — what ``module.load_state_dict`` does through its load hook.

    Why: loaders that bypass the hook, such as FSDP2's ``set_model_state_dict`` with a full
    state dict (it fills in the model's own entries for every key it lacks), need the layout
    given. A state dict in the multiplied layout already passes through.
    """
    out = dict(state_dict)
    for name, layer in module.named_modules():
        multipliers = _multipliers_of(name, layer)
        if multipliers is not None:
            _restart(out, f"{name}." if name else "", multipliers, full=True)
    return out


def _restart(state_dict: dict[str, Any], prefix: str, multipliers: Multipliers,
             full: bool = False) -> None:
    """Put the merged ``<prefix>weight`` of ``state_dict`` under the raw weight's key, with
    multipliers of 1 (``full``: of the parameters' global shapes, not like their shards)."""
    merged_key, original_key = prefix + "weight", prefix + _ORIGINAL
    if merged_key not in state_dict or original_key in state_dict:
        return
    state_dict[original_key] = state_dict.pop(merged_key)
    for name, parameter in multipliers.named_parameters():
        state_dict[prefix + _FACTOR + name] = (
            torch.ones(parameter.shape, dtype=parameter.dtype) if full
            else torch.ones_like(parameter)
        )


def _parameter_names(module: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names
