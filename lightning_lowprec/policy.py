"""A per-layer format policy from measured quantization error: ``recommend_formats``.

Which layers tolerate MXFP4 and which need MXFP8 is an empirical question, and the answer is
in numbers the package already computes: the signal-to-quantization-noise ratio of each
Linear layer's weight and input, ``10 log10(sum x^2 / sum (x - Q(x))^2)`` dB, the statistic
:class:`~lightning_lowprec.callbacks.NormMonitor` logs as ``quant/<layer>/weight_sqnr_db`` and
``act_sqnr_db``. :func:`layer_sqnr` measures it for every candidate format over a few forward
passes; :func:`recommend_formats` keeps, per layer, the cheapest candidate whose weight *and*
activation SQNR both reach a bound, and returns a mapping that
:class:`~lightning_lowprec.LowPrecision`, :func:`~lightning_lowprec.quantize_linears`,
:func:`~lightning_lowprec.export.export_mx` and ``lowprec-litgpt``'s ``lowprec.fmt`` accept::

    fmt = recommend_formats(model, batches, min_sqnr_db=25.0)
    trainer = L.Trainer(plugins=[LowPrecisionPlugin(fmt)])

Cost is measured in storage bits per weight element, the shared scale included
(:func:`bits_per_weight`: 4.25 / 6.25 / 8.25 for MXFP4 / MXFP6 / MXFP8).

What it does not know: SQNR is a proxy. It bounds the error each matmul operand gets, not the
loss of the trained model, and it is measured on the model as it is now (at initialisation,
or a checkpoint) — the weights and activations that training produces later may differ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_lowprec.callbacks.monitor import _quantization_sums
from lightning_lowprec.formats import Format, parse
from lightning_lowprec.nn import DEFAULT_EXCLUDE, layer_formats

__all__ = ["DEFAULT_CANDIDATES", "SQNR", "bits_per_weight", "layer_sqnr", "recommend_formats"]

DEFAULT_CANDIDATES: tuple[str, ...] = ("mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3")


class SQNR(NamedTuple):
    """One layer's quantization SQNR in one format, in dB (``inf``: exact)."""

    weight_db: float
    activation_db: float

    @property
    def worst_db(self) -> float:
        """The lower of the two: what a bound on the layer has to meet."""
        return min(self.weight_db, self.activation_db)


def bits_per_weight(fmt: str | Format) -> float:
    """Storage bits per element: the element's bits plus its share of the block's E8M0 scale
    (per-tensor formats: the element's bits; one fp32 scale per tensor is negligible)."""
    fmt = parse(fmt)
    return fmt.bits + (8 / fmt.block_size if fmt.block_size else 0.0)


@torch.no_grad()
def layer_sqnr(
    model: nn.Module,
    batches: Iterable[Any],
    candidates: Sequence[str | Format] = DEFAULT_CANDIDATES,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
) -> dict[str, dict[str, SQNR]]:
    """Weight and input-activation SQNR of every selected Linear layer in every candidate.

    Runs ``model(batch)`` (``model(*batch)`` for a tuple) for each batch in eval mode without
    gradients; each layer's input is hooked and quantized along its last axis (the matmul's
    reduction axis), as :class:`~lightning_lowprec.nn.QuantizedLinear` quantizes it, and the
    sums of squares are accumulated over all batches. Layers already converted keep their
    formats for the forward, so downstream inputs are those of the model as it runs.

    Args:
        model: any model; the layers are chosen as :func:`~lightning_lowprec.quantize_linears`
            chooses them (``include``, ``exclude``: its module-name patterns).
        batches: the inputs, e.g. a few batches of token ids.
        candidates: the formats to measure.

    Returns:
        ``{layer name: {format name: SQNR}}`` in module order.

    Raises:
        ValueError: an unknown format, no candidates, no batches, or no layer selected.
    """
    formats = [parse(f) for f in candidates]
    if not formats:
        raise ValueError("candidates must name at least one format, e.g. 'mxfp6_e2m3'.")
    names = list(layer_formats(model, formats[0], include=include, exclude=exclude))
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(len(formats), 2, dtype=torch.float32) for name in names}

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            for i, fmt in enumerate(formats):
                sums[name][i] += _quantization_sums(x, fmt, "even", None)[:2].cpu()
        return accumulate

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if not seen:
        raise ValueError("layer_sqnr needs at least one batch to measure the activations on.")
    out = {}
    for name in names:
        weight = modules[name].weight.detach()
        out[name] = {
            fmt.name: SQNR(_db(_quantization_sums(weight, fmt, "even", None)[:2].cpu()),
                           _db(sums[name][i]))
            for i, fmt in enumerate(formats)
        }
    return out


def recommend_formats(
    model: nn.Module,
    batches: Iterable[Any],
    candidates: Sequence[str | Format] = DEFAULT_CANDIDATES,
    *,
    min_sqnr_db: float,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
) -> dict[str, str]:
    """The cheapest candidate per Linear layer whose weight and activation SQNR reach a bound.

    Args:
        model, batches, candidates, include, exclude: as for :func:`layer_sqnr`.
        min_sqnr_db: the bound, in dB, on both the weight and the input SQNR of every layer.

    Returns:
        ``{layer name: format name}`` for every selected layer, in module order: a
        :data:`~lightning_lowprec.nn.FormatMap` for ``LowPrecision(fmt=...)``. The names are
        ``model``'s; a pattern also matches as a trailing run of dotted components, so the
        mapping of a ``GPT`` applies unchanged to a LightningModule holding it as ``gpt``.

    Raises:
        ValueError: a bound that is not a finite number, or as for :func:`layer_sqnr`.

    Warns:
        UserWarning: a layer no candidate brings to the bound gets the candidate with the
            highest SQNR (named in the message).
    """
    if isinstance(min_sqnr_db, bool) or not isinstance(min_sqnr_db, (int, float)) or not (
        math.isfinite(min_sqnr_db)
    ):
        raise ValueError(f"min_sqnr_db must be a finite number of dB, got {min_sqnr_db!r}.")
    measured = layer_sqnr(model, batches, candidates, include=include, exclude=exclude)
    by_cost = sorted(dict.fromkeys(parse(f).name for f in candidates), key=bits_per_weight)
    chosen = {}
    for name, per_format in measured.items():
        passing = [f for f in by_cost if per_format[f].worst_db >= min_sqnr_db]
        if passing:
            chosen[name] = passing[0]
            continue
        best = max(by_cost, key=lambda f: per_format[f].worst_db)
        warnings.warn(
            f"No candidate reaches {min_sqnr_db} dB on {name} (best: {best}, "
            f"{per_format[best].worst_db:.1f} dB); it gets {best}.",
            stacklevel=2,
        )
        chosen[name] = best
    return chosen


def _db(sums: Tensor) -> float:
    """``10 log10(signal / noise)`` of ``[signal, noise]`` sums (``inf`` for zero noise)."""
    signal, noise = sums.double().tolist()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
