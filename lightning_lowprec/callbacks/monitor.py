"""NormMonitor: weight, gradient, multiplier, LMD and quantization health, logged every N steps.

Low-precision runs fail by blowing up, and the blow-up shows first in norms: weight norms that
climb (the LMD paper's curves), multipliers that drift along a symmetry, gradients that clipping
keeps cutting, medians pinned at LMD's soft-clip bounds, quantized operands that saturate.
:class:`NormMonitor` (Trainer) and :class:`FabricNormMonitor` (Fabric, LitGPT) log all of it
through the run's loggers, every ``every_n_steps`` optimizer steps, as these tags (TensorBoard
groups its panels by the part before the first ``/``; ``<layer>`` is a parameter's qualified
name without ``.weight``, e.g. ``gpt.transformer.h.0.attn.qkv``):

=============================================  ==================================================
``norm/weight/<layer>``                        L2 norm of each trainable matrix (≥ 2-D, not a
                                               multiplier; with multipliers the stored ``W``).
``norm/weight/global``                         L2 norm over every trainable parameter except the
                                               multipliers.
``norm/grad/global``                           L2 norm of all the optimizer's gradients,
                                               multipliers included.
``norm/grad/global_clipped_params``            L2 norm over the parameters gradient clipping
                                               clips (the precision plugin's ``main_params``:
                                               without multipliers under
                                               :class:`~lightning_lowprec.LowPrecisionPlugin` or
                                               ``ExcludeMultipliersFromClipping``): the number
                                               ``gradient_clip_val`` is compared with.
``update_ratio/<layer>``                       ``‖W_k − W_{k−1}‖ / ‖W_{k−1}‖``: the relative
                                               step this optimizer step took (unitless).
``multiplier/<layer>.<kind>/{mean,min,max}``   each row / column / scalar multiplier
                                               (``<kind>``: ``row``, ``column``, ``scalar``).
``lmd/<layer>/logm_mean``, ``logm_std``        mean and standard deviation of the log-medians
                                               ``log(m±/m_ref)`` of the layer, both signs pooled,
                                               in nats (0 = the reference median). With one
                                               shared momentum and ``init="from_weights"`` (LMD's
                                               defaults) the mean stays at 0: each step moves
                                               ``log m+`` and ``log m−`` by opposite amounts.
``lmd/<layer>/at_bound_frac``                  fraction of the medians within ``bound_margin/λ``
                                               nats of the soft-clip bounds ``m_ref·e^{±1/λ}``
                                               (0 without decay, which has no bounds).
``lmd/<layer>/sign_flip_frac``                 fraction of the layer's weights whose sign
                                               changed since the previous log (from the second
                                               log on: the first one sets the reference).
``quant/<layer>/weight_sqnr_db``, ``act_...``  signal-to-quantization-noise ratio of the
                                               layer's weight / input activations,
                                               ``10·log10(Σx² / Σ(x − Q(x))²)`` in dB (+inf
                                               where the quantization is exact).
``quant/<layer>/weight_saturated_frac``, …     fraction of the operand's elements beyond the
                                               largest magnitude of their MX block (clamped by
                                               the quantizer; always 0 for per-tensor ``fp8_*``).
``quant/<layer>/weight_flushed_frac``, …       fraction of the operand's elements that are
                                               non-zero but quantize to zero.
``hist/weight/<layer>``, ``hist/multiplier/…`` with ``histograms=True``: value histograms
                                               (TensorBoard loggers only).
=============================================  ==================================================

When each number is taken (step ``k`` is logged when ``k`` is a multiple of ``every_n_steps``;
``k`` is the Trainer's count of batches that stepped the optimizers, its loggers' step, or in
Fabric the count of optimizer steps since setup):

* weights, multipliers, medians and the weight quantization: after optimizer step ``k``, when
  the parameters hold the point estimate (a posterior optimizer such as LMD restores it in its
  ``step``); the update ratio compares them with the point estimate after step ``k − 1``;
* gradients: those of step ``k`` before clipping — in the Trainer at ``on_before_optimizer_step``
  (after AMP unscaling); in Fabric when ``fabric.clip_gradients`` runs (after unscaling, before
  clipping), or, in a loop that does not clip, after the step, which leaves them unchanged;
* activations: the input of every :class:`~lightning_lowprec.nn.QuantizedLinear` in each
  training forward of step ``k`` (all gradient-accumulation micro-batches), through forward
  hooks that exist only from the end of step ``k − 1`` to the end of step ``k``. Forwards in
  eval mode (validation, generation) are skipped. Under bf16 autocast the statistics are those
  of the bf16 operands the layer quantizes. With ``rounding="stochastic"`` the monitor draws its
  own rounding (a private generator, so the run's random stream is untouched): the statistics
  are those of an equivalent draw, not of the very one the layer used.

Costs: between logged steps, a few attribute checks per step. For a logged step: a copy of the
trainable matrices (for the update ratio; ``update_ratio=False`` skips it) held from the end of
step ``k − 1`` to the end of step ``k``, one extra quantization of every quantized layer's input
per training forward of step ``k`` and of its weight, a few reductions per parameter, and one
device-to-host transfer; distributed, also two small all-reduces per pass (sum, max), one
for the activation sums and, under FSDP2, one all-gather per quantized layer's weight.
Persistently, 1 bit per LMD weight (the sign reference). The benchmark
``benchmarks/monitor.py`` measures the overhead at the default interval.

``torch.compile``: adding and removing the forward hooks around a logged step makes a compiled
model recompile; with a compiled model, log rarely or expect that cost per log.

Distributed: every rank computes, only global rank 0 logs (as Lightning's loggers do). The
numbers are those of the whole model and the whole global batch, whatever the strategy and the
world size: under FSDP2 (Lightning's ``ModelParallelStrategy`` with data-parallel
``fully_shard``, ``DTensor`` parameters sharded on dim 0) each rank computes sums of squares,
counts, minima and maxima on its local shards and one all-reduce per statistic kind (sum,
max) per pass combines them; the weight quantization runs on each quantized layer's gathered
weight (one all-gather per layer, as FSDP2's forward does), so per-tensor ``fp8_*`` scales are
the whole tensor's; the activation sums are all-reduced over the ranks (DDP too), so they are
of every rank's batch. Sums are taken in float64, so FSDP2 logs what DDP or one process logs
for the same weights up to the float64 rounding of the summation order (``tests/
test_fsdp_monitor.py``). FSDP1 (``FSDPStrategy``), DeepSpeed and XLA FSDP keep flat shards the
monitor cannot tell apart from whole tensors: it warns, and logs rank 0's shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import lightning.fabric.strategies as fabric_strategies
import lightning.pytorch as pl
import lightning.pytorch.strategies as trainer_strategies
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.wrappers import is_wrapped
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_lowprec.formats import Format
from lightning_lowprec.nn import QuantizedLinear
from lightning_lowprec.optim.groups import is_multiplier
from lightning_lowprec.optim.lmd import LMD
from lightning_lowprec.optim.sharded import global_sums, local
from lightning_lowprec.posterior import params_of
from lightning_lowprec.quantizer import (
    Rounding,
    ScaleRule,
    _biased_shared_exponents,
    _exp2,
    quantize,
)

__all__ = ["FabricNormMonitor", "NormMonitor"]

HISTOGRAM_BINS = 64
"""Buckets per histogram (equal widths between the tensor's min and max)."""

_FLAT_SHARDED_STRATEGIES = (
    fabric_strategies.FSDPStrategy,
    fabric_strategies.DeepSpeedStrategy,
    fabric_strategies.XLAFSDPStrategy,
    trainer_strategies.FSDPStrategy,
    trainer_strategies.DeepSpeedStrategy,
)
"""Strategies whose parameters are flat per-rank shards (not ``DTensor``s): not reduced."""
_WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight")
_MULTIPLIER_INFIX = ".parametrizations.weight.0."
_STATS = ("sqnr_db", "saturated_frac", "flushed_frac")
_F64 = torch.float64
_SUM, _MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX


class _Histogram(NamedTuple):
    """The arguments of ``SummaryWriter.add_histogram_raw``, on the host."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class _Reduction:
    """Numbers computed on local shards, each reduced over the ranks its tensor is sharded over.

    Why one object: every rank adds the same entries in the same order, and :meth:`reduce`
    makes one all-reduce per op and mesh dimension for all of them, not one per tensor. An
    entry whose tensor is not a ``DTensor`` (one device, DDP) keeps its value: no collective.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, list[tuple[str, Tensor, Tensor]]] = {_SUM: [], _MAX: []}

    def add(self, key: str, value: Tensor, owner: Tensor, op: Any = _SUM) -> None:
        """Reduce ``value`` (any shape, computed on ``owner``'s local shard) with ``op``."""
        self._entries[op].append((key, value.to(_F64), owner))

    def reduce(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for op, entries in self._entries.items():
            values: list[Tensor] = []
            owners: list[Tensor] = []
            for _, value, owner in entries:
                values.extend(value.reshape(-1).unbind())
                owners.extend([owner] * value.numel())
            reduced = global_sums(values, owners, op) if values else []
            start = 0
            for key, value, _ in entries:
                n = value.numel()
                part = reduced[start:start + n]
                out[key] = torch.stack(part).reshape(value.shape) if part else value
                start += n
        return out


class _Recorder:
    """What both front-ends share: which numbers, computed when.

    The front-ends decide the moments: :meth:`arm` at the end of the step before a logged one,
    :meth:`record_gradients` before clipping, :meth:`collect` after the logged step.
    """

    def __init__(
        self, every_n_steps: int, histograms: bool, update_ratio: bool, bound_margin: float
    ) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}.")
        for name, value in (("histograms", histograms), ("update_ratio", update_ratio)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        if (
            isinstance(bound_margin, bool)
            or not isinstance(bound_margin, (int, float))
            or not 0.0 <= bound_margin < 1.0
        ):
            raise ValueError(
                f"bound_margin must be a number in [0, 1) (a fraction of the half-width 1/λ of "
                f"LMD's log-median range), got {bound_margin!r}."
            )
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.update_ratio = update_ratio
        self.bound_margin = float(bound_margin)
        self.armed = False
        self.gradients: dict[str, Tensor] | None = None
        self._modules: list[tuple[str, nn.Module]] = []
        self._before: list[tuple[Tensor, Tensor]] = []
        self._hooks: list[RemovableHandle] = []
        self._activations: dict[str, tuple[Tensor, int]] = {}
        self._operand_dtypes: dict[str, torch.dtype] = {}
        self._signs: dict[Tensor, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def logs_at(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def watch(self, module: nn.Module) -> None:
        """Monitor ``module``; a second, third, ... module gets the prefix ``model1.``, ..."""
        if any(watched is module for _, watched in self._modules):
            return
        prefix = f"model{len(self._modules)}." if self._modules else ""
        self._modules.append((prefix, module))

    def arm(self) -> None:
        """Prepare the next step's numbers: snapshot the matrices, hook the quantized layers.

        Call when the parameters hold the point estimate and the step's first forward is ahead.
        """
        self.disarm()
        self.armed = True
        if self.update_ratio:
            with torch.no_grad():
                self._before = [(p, local(p).detach().clone()) for p, _ in self._matrices()]
        for name, layer in self._quantized_layers():
            self._hooks.append(layer.register_forward_hook(self._activation_hook(name)))

    def disarm(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.armed = False
        self.gradients = None
        self._hooks, self._before = [], []
        self._activations, self._operand_dtypes = {}, {}

    @torch.no_grad()
    def record_gradients(self, optimizer: Optimizer, clipped: Iterable[Tensor]) -> None:
        """The global gradient norms of ``optimizer``'s parameters and of the ``clipped`` ones.

        A second optimizer of the same step (manual optimisation) adds its gradients: the
        norms are over the parameters of every optimizer that stepped.
        """
        params = dict.fromkeys(params_of(optimizer))
        groups = {
            "norm/grad/global": [p.grad for p in params],
            "norm/grad/global_clipped_params": [p.grad for p in clipped],
        }
        reduction = _Reduction()
        for tag, grads in groups.items():
            for i, g in enumerate(grads):
                if g is not None:
                    reduction.add(f"{tag}/{i}", _square_sum(local(g)), g)
        squares = reduction.reduce()
        norms = {
            tag: _root_of_sum([squares[f"{tag}/{i}"] for i in range(len(grads))
                               if f"{tag}/{i}" in squares])
            for tag, grads in groups.items()
        }
        if self.gradients is not None:
            norms = {key: torch.hypot(self.gradients[key], norm) for key, norm in norms.items()}
        self.gradients = norms

    @torch.no_grad()
    def collect(
        self, optimizers: Iterable[Optimizer]
    ) -> tuple[dict[str, float], dict[str, _Histogram]]:
        """Every scalar (and histogram) of the step just taken; disarms."""
        names = self._names()
        trainable = [(p, name) for p, name in names.items() if p.requires_grad]
        medians = [
            (p, m) for optimizer in optimizers if isinstance(optimizer, LMD)
            for p, m in optimizer.log_medians() if p in names
        ]
        hist = self._histogram_tensors(trainable) if self.histograms else {}
        # Pass 1: sums, counts and extremes of the local shards; pass 2 what needs their totals.
        first = _Reduction()
        for p, name in trainable:
            x = local(p).detach()
            if is_multiplier(p):
                tag = f"multiplier/{_multiplier_name(name)}"
                first.add(f"{tag}/sum", x.sum(dtype=_F64), p)
                _add_extremes(first, tag, x, p)
            else:
                first.add(f"square/{name}", _square_sum(x), p)
        for p, before in self._before:
            if p in names:
                change = local(p).detach().float() - before.float()
                first.add(f"change/{names[p]}", _square_sum(change), p)
                first.add(f"before/{names[p]}", _square_sum(before), p)
        for p, m in medians:
            self._median_sums(first, f"lmd/{_layer_name(names[p])}", p, m)
        for tag, p in hist.items():
            _add_extremes(first, tag, local(p).detach(), p)
        totals = first.reduce()
        second = _Reduction()
        for p, m in medians:
            tag = f"lmd/{_layer_name(names[p])}"
            mean = (totals[f"{tag}/sum"] / (2 * m.pos.numel())).float()
            spread = sum(_square_sum(local(s) - mean) for s in (m.pos, m.neg))
            second.add(f"{tag}/spread", spread, m.pos)
        for tag, p in hist.items():
            _add_histogram_sums(second, tag, local(p).detach(), p, totals)
        totals.update(second.reduce())

        values: dict[str, Tensor] = {}
        squares = []
        for p, name in trainable:
            if not is_multiplier(p):
                squares.append(totals[f"square/{name}"])
                if p.ndim >= 2:
                    values[f"norm/weight/{_layer_name(name)}"] = totals[f"square/{name}"].sqrt()
        if squares:
            values["norm/weight/global"] = _root_of_sum(squares)
        values.update(self.gradients or {})
        for p, _ in self._before:
            if p in names:
                name = names[p]
                ratio = (totals[f"change/{name}"] / totals[f"before/{name}"]).sqrt()
                values[f"update_ratio/{_layer_name(name)}"] = ratio
        for p, name in trainable:
            if is_multiplier(p):
                tag = f"multiplier/{_multiplier_name(name)}"
                values[f"{tag}/mean"] = totals[f"{tag}/sum"] / p.numel()
                values[f"{tag}/min"] = -totals[f"{tag}/-min"]
                values[f"{tag}/max"] = totals[f"{tag}/max"]
        for p, m in medians:
            values.update(self._median_statistics(f"lmd/{_layer_name(names[p])}", p, m, totals))
        values.update(self._quantization_statistics())
        histograms = {tag: _histogram(tag, p.numel(), totals) for tag, p in hist.items()}
        self.disarm()
        return _to_host(values), histograms

    # -- the statistics ---------------------------------------------------------------------

    def _median_sums(self, reduction: _Reduction, tag: str, p: Tensor, medians: Any) -> None:
        """Pass 1 of the LMD statistics: the sum of the log-medians, the count at the bounds,
        the sign flips since the previous log (on the local shards)."""
        both = (local(medians.pos), local(medians.neg))
        reduction.add(f"{tag}/sum", sum(m.sum(dtype=_F64) for m in both), medians.pos)
        if math.isfinite(medians.low):
            center = (medians.low + medians.high) / 2.0
            reach = (1.0 - self.bound_margin) * (medians.high - medians.low) / 2.0
            pinned = sum(((m - center).abs_() >= reach).count_nonzero() for m in both)
            reduction.add(f"{tag}/pinned", pinned, medians.pos)
        signs = _packed_signs(local(p))
        previous = self._signs.get(p)
        if previous is not None and previous.shape == signs.shape:
            reduction.add(f"{tag}/flips", _popcount(previous ^ signs), p)
        self._signs[p] = signs

    @staticmethod
    def _median_statistics(
        tag: str, p: Tensor, medians: Any, totals: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        count = 2 * medians.pos.numel()
        mean = totals[f"{tag}/sum"] / count
        values = {
            f"{tag}/logm_mean": mean - medians.log_m_ref,
            f"{tag}/logm_std": (totals[f"{tag}/spread"] / count).sqrt(),
            f"{tag}/at_bound_frac": totals.get(f"{tag}/pinned", mean.new_zeros(())) / count,
        }
        if f"{tag}/flips" in totals:
            values[f"{tag}/sign_flip_frac"] = totals[f"{tag}/flips"] / p.numel()
        return values

    def _quantization_statistics(self) -> dict[str, Tensor]:
        """SQNR, saturation and flushing of every quantized layer's weight and input.

        The weight's on the whole (gathered) weight, identically on every rank; the
        activations' sums all-reduced over the ranks (one collective for all layers).
        """
        layers = list(self._quantized_layers())
        operands: dict[str, dict[str, Tensor]] = {}
        for name, layer in layers:
            dtype = self._operand_dtypes.get(name)
            weight = _full(layer.weight.detach())
            weight = weight if dtype is None else weight.to(dtype)
            generator = self._generator(weight.device)
            sums = _quantization_sums(
                weight, layer.w_fmt, layer.rounding, generator, layer.scale_rule
            ).to(_F64)
            elements = sums.new_full((1,), weight.numel())
            operands[name] = {"weight": torch.cat([sums, elements])}
        if self._activations:
            # Every layer a row (zeros where this rank saw no input), so all ranks reduce alike.
            rows = []
            for name, layer in layers:
                sums, elements = self._activations.get(name, (None, 0))
                row = torch.zeros(5, dtype=_F64, device=layer.weight.device)
                if sums is not None:
                    row[:4], row[4] = sums, elements
                rows.append(row)
            activations = torch.stack(rows)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(activations)
            for (name, _), row in zip(layers, activations, strict=True):
                if row[4] > 0:
                    operands[name]["act"] = row
        values = {}
        for name, by_operand in operands.items():
            for operand, row in by_operand.items():
                signal, noise, saturated, flushed, elements = row.unbind()
                stats = (10.0 * torch.log10(signal / noise), saturated / elements,
                         flushed / elements)
                for stat, value in zip(_STATS, stats, strict=True):
                    values[f"quant/{name}/{operand}_{stat}"] = value
        return values

    def _activation_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not layer.training or not args:
                return
            x = args[0].detach()
            device_type = x.device.type
            dtype = None
            if torch.is_autocast_enabled(device_type):
                # QuantizedLinear casts its operands as autocast casts F.linear's: do the same.
                dtype = torch.get_autocast_dtype(device_type)
                x = x.to(dtype)
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                generator = self._generator(x.device)
                sums = _quantization_sums(
                    x, layer.a_fmt, layer.rounding, generator, layer.scale_rule
                )
            total, elements = self._activations.get(name, (0, 0))
            self._activations[name] = (sums + total, elements + x.numel())
            self._operand_dtypes[name] = dtype

        return hook

    @staticmethod
    def _histogram_tensors(trainable: list[tuple[Tensor, str]]) -> dict[str, Tensor]:
        tensors = {}
        for p, name in trainable:
            if is_multiplier(p):
                tensors[f"hist/multiplier/{_multiplier_name(name)}"] = p
            elif p.ndim >= 2:
                tensors[f"hist/weight/{_layer_name(name)}"] = p
        return tensors

    # -- what is watched --------------------------------------------------------------------

    def _names(self) -> dict[Tensor, str]:
        names: dict[Tensor, str] = {}
        for prefix, module in self._modules:
            for name, p in module.named_parameters():
                names.setdefault(p, prefix + name)
        return names

    def _matrices(self) -> Iterator[tuple[Tensor, str]]:
        for p, name in self._names().items():
            if p.requires_grad and p.ndim >= 2 and not is_multiplier(p):
                yield p, name

    def _quantized_layers(self) -> Iterator[tuple[str, QuantizedLinear]]:
        for prefix, module in self._modules:
            for name, layer in module.named_modules():
                if isinstance(layer, QuantizedLinear):
                    yield prefix + name, layer

    def _generator(self, device: torch.device) -> torch.Generator:
        """A private generator for stochastic rounding: the run's random stream stays as is."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(0)
        return self._generators[device]


class NormMonitor(Callback):
    """Trainer callback: log norms and low-precision health every N steps (see module doc).

    ``Trainer(callbacks=[NormMonitor()])``; the tags go to every logger of the Trainer
    (TensorBoard by default), at ``step`` = the batches that stepped the optimizers so far,
    this one included (Lightning's loggers' step counter; ``trainer.global_step`` with one
    optimizer in automatic optimisation, half of it with two in manual optimisation). The
    gradient norms are over every optimizer that stepped. For Fabric and LitGPT use
    :class:`FabricNormMonitor` (Fabric calls any method named like a hook, so one class cannot
    serve both).

    Args:
        every_n_steps: log after every ``every_n_steps``-th optimizer step.
        histograms: also log histograms of the matrices and multipliers (TensorBoard loggers;
            costs a pass over every parameter and a bucket transfer per logged step).
        update_ratio: log ``update_ratio/<layer>``; needs a copy of the trainable matrices
            during each logged step (turn off when memory is tight).
        bound_margin: an LMD median counts as at its soft-clip bound when it is within
            ``bound_margin / λ`` nats of it (a fraction of the half-width ``1/λ``), in [0, 1).

    Raises:
        ValueError: an argument outside the ranges above.
        MisconfigurationException: at ``fit``, a Trainer without a logger.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: bool = False,
        update_ratio: bool = True,
        bound_margin: float = 0.01,
    ) -> None:
        self._recorder = _Recorder(every_n_steps, histograms, update_ratio, bound_margin)
        self._armed_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "NormMonitor needs a logger to write to; the Trainer has none (logger=False)."
            )
        _warn_if_flat_sharded(trainer.strategy)
        self._recorder.watch(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._arm_if_next_logs(trainer, _stepping_batches(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._recorder.armed:
            clipped = trainer.precision_plugin.main_params(optimizer)
            self._recorder.record_gradients(optimizer, clipped)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = _stepping_batches(trainer, this_one=True)
        if self._recorder.armed and step >= self._armed_step:
            scalars, histograms = self._recorder.collect(trainer.optimizers)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=step)
                _write_histograms(trainer.loggers, histograms, step)
        if not self._recorder.armed:
            self._arm_if_next_logs(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder.disarm()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._recorder.disarm()

    def _arm_if_next_logs(self, trainer: pl.Trainer, step: int) -> None:
        if self._recorder.logs_at(step + 1):
            self._recorder.arm()
            self._armed_step = step + 1


def _stepping_batches(trainer: pl.Trainer, this_one: bool = False) -> int:
    """The Trainer's step count that its loggers use: batches that stepped the optimizers
    (``fit_loop.epoch_loop._batches_that_stepped``), one per batch however many optimizers
    step in it; with ``this_one`` (at ``on_train_batch_end``) counting the current batch if
    it steps, which the loop adds only after the hook."""
    epoch_loop = trainer.fit_loop.epoch_loop
    stepped = epoch_loop._batches_that_stepped
    return stepped + 1 if this_one and not epoch_loop._should_accumulate() else stepped


class FabricNormMonitor:
    """Fabric callback: log norms and low-precision health every N steps (see module doc).

    ``Fabric(callbacks=[FabricNormMonitor()], loggers=[TensorBoardLogger(...)])``; the tags go
    through ``fabric.log_dict`` at ``step`` = optimizer steps since setup. It hooks itself in at
    ``fabric.setup(model, ...)`` (Fabric's ``on_after_setup``) and counts steps in
    ``on_after_optimizer_step``, both fired by Fabric itself, so loops that call neither
    ``fabric.call`` nor the monitor — LitGPT's scripts, with the callback registered under the
    entry-point group ``lightning.fabric.callbacks_factory`` — are monitored as they are.
    (LitGPT logs its own metrics at iteration numbers, which count micro-batches: with gradient
    accumulation its x-axis runs that many times faster than the monitor's.)

    ``fabric.setup_module`` alone does not fire ``on_after_setup`` (LitGPT's LoRA script uses
    it): call ``monitor.on_after_setup(fabric, model)`` yourself after it. To carry the step
    count across a resume, save and load the monitor with the rest of the state
    (``fabric.save(path, {"model": model, "monitor": monitor})``).

    Args: as for :class:`NormMonitor`; the defaults make it constructible without arguments.

    Raises:
        ValueError: an argument outside its range.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: bool = False,
        update_ratio: bool = True,
        bound_margin: float = 0.01,
    ) -> None:
        self._recorder = _Recorder(every_n_steps, histograms, update_ratio, bound_margin)
        self._fabric: Fabric | None = None
        self._saw_setup = False
        self._warned = False
        self._step = 0

    def on_after_setup(self, fabric: Fabric, module: nn.Module) -> None:
        self._saw_setup = True
        if not fabric.loggers:
            self._warn_once("FabricNormMonitor found no logger on this Fabric; it logs nothing.")
            return
        if self._fabric is None:
            self._fabric = fabric
            _warn_if_flat_sharded(fabric.strategy)
            precision = fabric.strategy.precision
            precision.unscale_gradients = _GradientsBeforeClipping(
                precision.unscale_gradients, self._before_clipping
            )
        self._recorder.watch(module.module if is_wrapped(module) else module)
        if not self._recorder.armed and self._recorder.logs_at(self._step + 1):
            self._recorder.arm()

    def on_after_optimizer_step(self, strategy: Any, optimizer: Optimizer) -> None:
        if self._fabric is None:
            if not self._saw_setup and strategy.is_global_zero:
                self._warn_once(
                    "FabricNormMonitor did not see fabric.setup(model, ...), so it does not know "
                    "the model; after fabric.setup_module(model), call "
                    "monitor.on_after_setup(fabric, model)."
                )
            return
        self._step += 1
        if self._recorder.armed:  # armed at the previous step for this one
            if self._recorder.gradients is None:  # the loop did not clip
                clipped = strategy.precision.main_params(optimizer)
                self._recorder.record_gradients(optimizer, clipped)
            scalars, histograms = self._recorder.collect([optimizer])
            if self._fabric.is_global_zero:
                self._fabric.log_dict(scalars, step=self.log_step(self._step))
                _write_histograms(self._fabric.loggers, histograms, self.log_step(self._step))
        if self._recorder.logs_at(self._step + 1):
            self._recorder.arm()

    def log_step(self, step: int) -> int:
        """The logger step of optimizer step ``step``'s numbers: ``step`` itself.

        Override to share another loop's x-axis (``lowprec-litgpt`` maps it onto litgpt's
        micro-batch iteration count, where litgpt logs its own metrics).
        """
        return step

    def state_dict(self) -> dict[str, int]:
        """The optimizer-step count, so that a resumed run logs at the right steps."""
        return {"step": self._step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._step = int(state_dict["step"])
        self._recorder.disarm()
        if self._fabric is not None and self._recorder.logs_at(self._step + 1):
            self._recorder.arm()

    def _before_clipping(self, optimizer: Optimizer) -> None:
        if self._recorder.armed and self._recorder.gradients is None:
            clipped = self._fabric.strategy.precision.main_params(optimizer)
            self._recorder.record_gradients(optimizer, clipped)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(message)


class _GradientsBeforeClipping:
    """A precision plugin's ``unscale_gradients``, then a look at the gradients.

    Fabric calls ``unscale_gradients`` only from ``fabric.clip_gradients``, right before it
    clips: the one moment the unscaled, unclipped gradients of a step can be seen.
    """

    def __init__(
        self, unscale_gradients: Callable[[Optimizer], None], look: Callable[[Optimizer], None]
    ) -> None:
        self.unscale_gradients = unscale_gradients
        self.look = look

    def __call__(self, optimizer: Optimizer) -> None:
        self.unscale_gradients(optimizer)
        self.look(optimizer)


def _quantization_sums(
    x: Tensor,
    fmt: Format,
    rounding: Rounding,
    generator: torch.Generator,
    scale_rule: ScaleRule = "floor",
) -> Tensor:
    """``[Σx², Σ(x − Q(x))², saturated, flushed]`` (fp32) of ``x`` quantized to ``fmt``.

    Along the last axis, in ``x``'s dtype: as :class:`~lightning_lowprec.nn.QuantizedLinear`
    quantizes its weight and its input (the reduction axis of the matmul), with its scale rule.
    """
    q = quantize(x, fmt, -1, rounding, generator, scale_rule).float()
    dtype, x = x.dtype, x.float()
    flushed = ((x != 0) & (q == 0)).count_nonzero()
    saturated = _saturated(x, fmt, scale_rule, dtype)
    sums = [x.square().sum(), (x - q).square().sum(), saturated, flushed]
    return torch.stack([s.float() for s in sums])


def _saturated(
    x: Tensor, fmt: Format, scale_rule: ScaleRule = "floor", dtype: torch.dtype = torch.float32
) -> Tensor:
    """How many elements of fp32 ``x`` (a ``dtype`` tensor widened) lie beyond the largest
    magnitude of their MX block.

    The block's largest magnitude is ``max · 2**shared_exp`` with the quantizer's
    ``shared_exp`` for ``scale_rule`` and ``dtype`` (the spec's ``floor(log2(amax)) − emax``,
    or rceil's ``ceil(log2(amax / max))``, clamped to E8M0 and to ``dtype``'s finite range);
    the quantizer clamps such elements there (under rceil almost never: where ``amax / max``
    rounds down onto a power of two in fp32, or a block max in ``dtype``'s top binade).
    Per-tensor formats scale the tensor's amax onto the format's max: nothing saturates.
    """
    if fmt.scaling == "tensor":
        return x.new_zeros((), dtype=torch.long)
    magnitudes = x.reshape(-1, x.shape[-1]).abs()
    pad = -magnitudes.shape[1] % fmt.block_size
    if pad:
        magnitudes = F.pad(magnitudes, (0, pad))
    magnitudes = magnitudes.unflatten(1, (-1, fmt.block_size))
    amax = magnitudes.amax(-1, keepdim=True)
    shared = _biased_shared_exponents(amax, fmt, scale_rule, dtype) - 127
    return (magnitudes > fmt.max * _exp2(shared)).count_nonzero()


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _packed_signs(p: Tensor) -> Tensor:
    """``p > 0``, 8 weights per byte: a sign reference costs 1 bit per weight."""
    bits = (p.detach() > 0).flatten().to(torch.uint8)
    bits = F.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    return (bits << _BIT_SHIFTS.to(p.device)).sum(1, dtype=torch.uint8)


def _popcount(packed: Tensor) -> Tensor:
    """The number of set bits in a uint8 tensor."""
    return ((packed.unsqueeze(1) >> _BIT_SHIFTS.to(packed.device)) & 1).sum()


def _square_sum(x: Tensor) -> Tensor:
    """``Σx²`` of ``x`` in float64 (squares in fp32): summed in any order, shards or whole,
    the result agrees to ~1e-16 relative."""
    return x.float().square().sum(dtype=_F64)


def _root_of_sum(squares: list[Tensor]) -> Tensor:
    """``sqrt(Σ squares)``; 0 for none."""
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=_F64)


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a ``DTensor`` all-gathered (a collective), anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _add_extremes(reduction: _Reduction, tag: str, x: Tensor, owner: Tensor) -> None:
    """``{tag}/max`` and ``{tag}/-min`` (the max of ``-x``) of ``x``; an empty shard adds
    ``-inf``, which leaves the other ranks' extremes."""
    if x.numel() == 0:
        low, high = x.new_full((), math.inf, dtype=_F64), x.new_full((), -math.inf, dtype=_F64)
    else:
        low, high = torch.aminmax(x.float())
    reduction.add(f"{tag}/max", high, owner, _MAX)
    reduction.add(f"{tag}/-min", -low, owner, _MAX)


def _add_histogram_sums(
    reduction: _Reduction, tag: str, x: Tensor, owner: Tensor, totals: Mapping[str, Tensor]
) -> None:
    """The bucket counts, ``Σx`` and ``Σx²`` of ``x`` in :data:`HISTOGRAM_BINS` equal buckets
    between the whole tensor's min and max (``totals``), binned on ``x``'s device."""
    x = x.flatten().float()
    low, high = -totals[f"{tag}/-min"].float(), totals[f"{tag}/max"].float()
    width = (high - low) / HISTOGRAM_BINS
    index = ((x - low) / width.clamp_min(torch.finfo(torch.float32).tiny)).long()
    counts = torch.bincount(index.clamp_(0, HISTOGRAM_BINS - 1), minlength=HISTOGRAM_BINS)
    reduction.add(f"{tag}/counts", counts, owner)
    reduction.add(f"{tag}/sum", x.sum(dtype=_F64), owner)
    reduction.add(f"{tag}/squares", _square_sum(x), owner)


def _histogram(tag: str, numel: int, totals: Mapping[str, Tensor]) -> _Histogram:
    """The reduced sums of ``tag`` as ``add_histogram_raw``'s arguments, on the host."""
    low, high = -totals[f"{tag}/-min"].float().item(), totals[f"{tag}/max"].float().item()
    total, squares = totals[f"{tag}/sum"].item(), totals[f"{tag}/squares"].item()
    if high == low:
        limits, bucket_counts = [high], [float(numel)]
    else:
        step = (high - low) / HISTOGRAM_BINS
        limits = [low + step * (i + 1) for i in range(HISTOGRAM_BINS)]
        bucket_counts = totals[f"{tag}/counts"].tolist()
    return _Histogram(low, high, numel, total, squares, limits, bucket_counts)


def _write_histograms(
    loggers: Iterable[Any], histograms: Mapping[str, _Histogram], step: int
) -> None:
    if not histograms:
        return
    writers = [
        logger.experiment
        for logger in loggers
        if hasattr(logger.experiment, "add_histogram_raw")
    ]
    if not writers:
        rank_zero_warn("NormMonitor(histograms=True) needs a TensorBoard logger; none is set.")
    for writer in writers:
        for tag, histogram in histograms.items():
            writer.add_histogram_raw(tag, *histogram, global_step=step)


def _to_host(values: Mapping[str, Tensor]) -> dict[str, float]:
    """The 0-dim tensors as floats, with one transfer per device."""
    by_device: dict[torch.device, list[str]] = {}
    for name, value in values.items():
        by_device.setdefault(value.device, []).append(name)
    floats = {}
    for names in by_device.values():
        stacked = torch.stack([values[name].to(_F64) for name in names]).tolist()
        floats.update(zip(names, stacked, strict=True))
    return {name: floats[name] for name in values}


def _layer_name(name: str) -> str:
    """``a.b.weight`` and ``a.b.parametrizations.weight.original`` → ``a.b``."""
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _multiplier_name(name: str) -> str:
    """``a.b.parametrizations.weight.0.row_multiplier`` → ``a.b.row``; other names unchanged."""
    layer, infix, kind = name.partition(_MULTIPLIER_INFIX)
    if infix and kind.endswith("_multiplier"):
        return f"{layer}.{kind.removesuffix('_multiplier')}"
    return name


def _warn_if_flat_sharded(strategy: Any) -> None:
    if isinstance(strategy, _FLAT_SHARDED_STRATEGIES):
        rank_zero_warn(
            f"NormMonitor reduces over FSDP2 (ModelParallelStrategy) DTensor shards only; under "
            f"{type(strategy).__name__} the parameters are flat shards, so its norms and "
            "statistics are those of rank 0's shard."
        )
