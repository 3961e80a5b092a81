"""PosteriorSampler: when a model's parameters hold a posterior sample, and that none leaks.

The precision plugins (:class:`~lightning_lowprec.LowPrecision` for Fabric,
:class:`~lightning_lowprec.LowPrecisionPlugin` for the Trainer) own one sampler each and leave
every sampling decision to it. The sampler is the one place that

* finds a model's posterior optimizers: from the model's parameters, each of which names the
  latest posterior optimizer built over it (:func:`~lightning_lowprec.posterior.owner`), so
  an optimizer rebuilt while an LR scheduler still holds the old one simply replaces it, and
  a ``copy.deepcopy`` of the model (a teacher, an EMA copy) is nobody's;
* draws and restores: it asks the optimizers to write the sample or the point estimate
  (writing them stays the optimizer's job, see :mod:`~lightning_lowprec.posterior`);
* decides, for Fabric, whether a forward is a *training forward*, per module: a forward
  pre-hook on each set-up module draws the sample of that module's optimizers when it runs
  with gradients enabled in training mode, and restores their point estimate otherwise, so a
  critic in ``train()`` does not sample a generator in ``eval()``;
* keeps samples out of every saved or exported state: ``state_dict()`` of a converted module,
  also as part of a larger one (``fabric.save``, ``ModelCheckpoint``, ``OnExceptionCheckpoint``,
  exporters), reads the point estimate, and the parameters hold whatever they held before
  the call (the sample is drawn again, bit for bit: it is a pure function of the optimizer's
  state). A submodule's own ``state_dict()`` (``model.gpt.state_dict()``) shows what the
  parameters hold, a sample inside a training step. ``load_state_dict`` restores first, so
  a restore after it cannot overwrite the loaded weights;
* restores on every exceptional exit (:meth:`PosteriorSampler.restoring_on_error`, catching
  ``BaseException``: Ctrl-C too) of a region that runs at a sample.

The hooks hold the sampler weakly and pickle to no-ops: a set-up model stays picklable, and a
model unpickled elsewhere is not tied to this process's optimizers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowprec.fsdp import reshard
from lightning_lowprec.posterior import (
    PosteriorOptimizer,
    is_posterior,
    owner,
    ownership_changes,
    params_of,
    track,
)
from lightning_lowprec.posterior import unwrap as unwrap_optimizer

__all__ = ["PosteriorSampler", "drawn_by_caller"]

_drawn_by_caller = 0
"""Depth of :func:`drawn_by_caller` regions: while > 0 the forward hooks leave weights alone."""


@contextmanager
def drawn_by_caller() -> Iterator[None]:
    """Forwards inside run at whatever the parameters hold: for code that writes posterior
    draws itself (:func:`~lightning_lowprec.predictive.posterior_predict`), whose evaluation
    forwards the Fabric forward hook would otherwise restore to the point estimate. The caller
    restores the point estimate before leaving."""
    global _drawn_by_caller
    _drawn_by_caller += 1
    try:
        yield
    finally:
        _drawn_by_caller -= 1


class PosteriorSampler:
    """Draws and restores the posterior samples of the modules it is attached to.

    Args:
        sample: ``False`` never draws (the optimizer's deterministic dynamics); restoring and
            the state-dict guard work either way.
    """

    def __init__(self, sample: bool = True) -> None:
        self.sample = sample
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # Every optimizer found so far: the state-dict hooks' cheap "is anything sampled?".
        self._known: weakref.WeakSet[Any] = weakref.WeakSet()
        # id(module) -> what its state_dict() restored, to draw again once it is read.
        self._redraw: dict[int, tuple[list[PosteriorOptimizer], bool]] = {}
        # id(module) -> (ownership_changes(), module, its optimizers), all weakly: walking a
        # model's parameters costs ~0.5 ms per forward for pythia-14m, the cache ~1 us.
        self._owners: dict[int, tuple[int, weakref.ref, list[weakref.ref]]] = {}
        # module -> the handle of its per-forward hook (see :meth:`hooks_first`).
        self._forward_hooks: weakref.WeakKeyDictionary[nn.Module, Any] = (
            weakref.WeakKeyDictionary())

    def __getstate__(self) -> dict[str, Any]:
        """The setting only: a ``WeakSet`` cannot be pickled, and a spawned process attaches
        its own modules."""
        return {"sample": self.sample}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def attach(self, module: nn.Module, *, per_forward: bool) -> None:
        """Guard ``module``'s state dicts; with ``per_forward`` (Fabric) also decide at each of
        its forwards whether it runs at a sample (see the module doc). Idempotent."""
        if module in self._modules:
            return
        self._modules.add(module)
        ref = weakref.ref(self)
        module.register_state_dict_pre_hook(_Hook(ref, "_before_state_dict"))
        module.register_state_dict_post_hook(_Hook(ref, "_after_state_dict"))
        module.register_load_state_dict_pre_hook(_Hook(ref, "_before_load"))
        if per_forward:
            self._forward_hooks[module] = module.register_forward_pre_hook(
                _Hook(ref, "_before_forward"), prepend=True)

    def hooks_first(self) -> None:
        """Put each module's per-forward hook back in front of its forward pre-hooks.

        Under FSDP2 (``ModelParallelStrategy``, whose ``fully_shard`` runs after the plugin's
        ``convert_module``) the module's first pre-hook all-gathers the sharded parameters;
        the sample has to be in the shards before that, so the sampler's hook must run first.
        One dict lookup per module and forward when nothing moved.
        """
        for module, handle in list(self._forward_hooks.items()):
            if next(iter(module._forward_pre_hooks), None) != handle.id:
                hook = module._forward_pre_hooks[handle.id]
                handle.remove()
                self._forward_hooks[module] = module.register_forward_pre_hook(
                    hook, prepend=True)

    def claim(self, optimizers: Iterable[Any]) -> None:
        """The posterior ones among ``optimizers`` own their parameters from now on (the
        Trainer's ``configure_optimizers`` result outranks any other optimizer built)."""
        for optimizer in map(unwrap_optimizer, optimizers):
            if is_posterior(optimizer):
                track(optimizer)
                self._known.add(optimizer)

    def optimizers(self, module: nn.Module | None = None) -> list[PosteriorOptimizer]:
        """The posterior optimizers that own parameters of ``module`` (default: of every
        attached module), in order of first parameter.

        Raises:
            RuntimeError: a found optimizer also trains parameters that a later posterior
                optimizer owns (each would overwrite the other's sample).
        """
        modules = list(self._modules) if module is None else [module]
        found: dict[int, PosteriorOptimizer] = {}
        for m in modules:
            for optimizer in self._owners_of(m):
                found.setdefault(id(optimizer), optimizer)
        return list(found.values())

    def _owners_of(self, module: nn.Module) -> list[PosteriorOptimizer]:
        changes = ownership_changes()
        cached = self._owners.get(id(module))
        if cached is not None and cached[0] == changes and cached[1]() is module:
            optimizers = [ref() for ref in cached[2]]
            if all(optimizer is not None for optimizer in optimizers):
                return optimizers
        found: dict[int, PosteriorOptimizer] = {}
        for p in module.parameters():
            optimizer = owner(p)
            if optimizer is not None:
                found.setdefault(id(optimizer), optimizer)
        for optimizer in found.values():
            _check_owns_all(optimizer)
            self._known.add(optimizer)
        refs = [weakref.ref(optimizer) for optimizer in found.values()]
        self._owners[id(module)] = (ownership_changes(), weakref.ref(module), refs)
        return list(found.values())

    def draw(self, module: nn.Module | None = None) -> None:
        """Write this step's sample of the optimizers of ``module`` (default: of all)."""
        if self.sample:
            for optimizer in self.optimizers(module):
                optimizer.sample_()

    def restore(self, module: nn.Module | None = None) -> None:
        """Write the point estimate back (a no-op for optimizers holding none)."""
        for optimizer in self.optimizers(module):
            optimizer.restore_()

    def held(self) -> list[PosteriorOptimizer]:
        """The optimizers of the attached modules whose parameters hold a sample now."""
        return [optimizer for optimizer in self.optimizers() if optimizer.holds_sample]

    @contextmanager
    def restoring_on_error(self) -> Iterator[None]:
        """Run the block; whatever it raises (``KeyboardInterrupt`` too) leaves the point
        estimate in the parameters, since the backward that would restore it never comes."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    def attached(self) -> list[nn.Module]:
        """The modules attached (alive), in no particular order."""
        return list(self._modules)

    def device_type(self) -> str | None:
        """The device type of the attached modules' parameters (``None`` before any)."""
        for module in self._modules:
            for p in module.parameters():
                return p.device.type
        return None

    # -- hooks --------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if _drawn_by_caller:
            return
        reshard(module)  # FSDP2: the shards, not a stale gathered copy, feed this forward
        if torch.is_grad_enabled() and module.training:
            self.draw(module)
        else:
            self.restore(module)

    def _before_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not any(optimizer.holds_sample for optimizer in self._known):
            return  # the common case: one check per known optimizer
        held = [optimizer for optimizer in self.optimizers(module) if optimizer.holds_sample]
        for optimizer in held:
            optimizer.restore_()
        if held:
            self._redraw[id(module)] = (held, keep_vars)

    def _after_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any
    ) -> None:
        redraw = self._redraw.pop(id(module), None)
        if redraw is None:
            return
        held, keep_vars = redraw
        if keep_vars:  # the live Parameters were asked for: they keep the point estimate
            return
        sampled = {id(p) for optimizer in held for p in params_of(optimizer)}
        for key, p in module.named_parameters(prefix=prefix[:-1], remove_duplicate=False):
            value = state_dict.get(key)
            if id(p) in sampled and isinstance(value, Tensor):
                state_dict[key] = value.clone()  # it shares p's storage, and p is redrawn
        for optimizer in held:
            optimizer.sample_()

    def _before_load(self, module: nn.Module, *args: Any) -> None:
        self.restore(module)


class _Hook:
    """A module hook calling ``sampler.<method>``; pickled or copied, it does nothing."""

    def __init__(self, sampler: weakref.ref | None, method: str) -> None:
        self._sampler, self._method = sampler, method

    def __call__(self, *args: Any) -> None:
        sampler = None if self._sampler is None else self._sampler()
        if sampler is not None:
            getattr(sampler, self._method)(*args)

    def __reduce__(self) -> tuple[type, tuple]:
        return _Hook, (None, self._method)


def _check_owns_all(optimizer: PosteriorOptimizer) -> None:
    """Refuse an optimizer that a later one superseded for part of its parameters only."""
    for p in params_of(optimizer):
        later = owner(p)
        if later is None:  # added by add_param_group after the optimizer was built
            track(optimizer, [p])
        elif later is not optimizer:
            raise RuntimeError(
                f"Two posterior optimizers ({type(optimizer).__name__}, "
                f"{type(later).__name__}) train parameters of the same model: the later one "
                "owns only some of the earlier one's parameters, so each would overwrite the "
                "other's sample. Build the later optimizer over all of them, or delete the "
                "earlier one (`del optimizer`)."
            )
