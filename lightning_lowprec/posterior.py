"""The small protocol a posterior optimizer offers the plugin (LMD implements it).

A posterior optimizer keeps a distribution over the weights. The training forward and backward
must run at a *sample* of it; at rest (validation, checkpointing, after fit) the parameters
hold the *point estimate*. Three operations suffice:

* ``sample_()`` writes this step's sample into the parameters. It is idempotent within an
  optimizer step and depends only on the optimizer's state (seed, step count, parameter
  index), never on a global generator: every gradient-accumulation micro-batch and every DDP
  rank draws the same sample, and a run resumed from ``state_dict()`` draws the same samples
  as the uninterrupted one.
* ``restore_()`` writes the point estimate back (a no-op when no sample is held).
* ``step()`` computes the update from the gradient taken at the sample, and leaves the new
  point estimate in the parameters. Because the medians move only by the (all-reduced)
  gradient, DDP ranks keep identical state.

The plugin calls ``sample_()`` before each training forward and ``restore_()`` after its
backward (every micro-batch of a step gets the same sample); :func:`sampled_params` is the
form for hand-written loops: the point estimate comes back however the block exits, so a
sample can never leak into evaluation or a checkpoint.

    with sampled_params(optimizer):
        loss = model(batch).loss
        loss.backward()
    optimizer.step()

A posterior optimizer also calls :func:`track` on itself when it is built: every one of its
parameters then names it (a weak reference, :func:`owner`). Fabric shows a precision plugin no
optimizer before the optimizer's first ``step()``, but the first training forward already
needs the sample, so the plugin's :class:`~lightning_lowprec.sampling.PosteriorSampler` finds
the posterior optimizers of a model from the model's own parameters. The latest optimizer
built over a parameter owns it: one rebuilt while an LR scheduler still holds the old one
replaces it, and no process-wide list of optimizers is kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "PosteriorOptimizer", "is_posterior", "owner", "ownership_changes", "params_of",
    "sampled_params", "track", "unwrap",
]

_OWNER_ATTR = "_lowprec_posterior"
_CLAIMS = [0]  # how many times track() ran: lets a caller cache who owns what


@runtime_checkable
class PosteriorOptimizer(Protocol):
    """What the plugin needs from a posterior optimizer (see the module docstring)."""

    @property
    def holds_sample(self) -> bool:
        """Whether the parameters currently hold a sample rather than the point estimate."""
        ...

    def sample_(self) -> None:
        """Write this step's sample into the parameters (idempotent within a step)."""
        ...

    def restore_(self) -> None:
        """Write the point estimate back into the parameters (no-op if not sampled)."""
        ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update from the gradient at this step's sample; leave the point estimate."""
        ...


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside a Lightning/Fabric wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def is_posterior(optimizer: object) -> bool:
    """Whether ``optimizer`` (or the optimizer a Lightning/Fabric wrapper holds) is one."""
    return isinstance(unwrap(optimizer), PosteriorOptimizer)


def params_of(optimizer: Any) -> list[Tensor]:
    """Every parameter of ``optimizer``'s param groups, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextmanager
def sampled_params(optimizer: PosteriorOptimizer) -> Iterator[None]:
    """Run the block at this step's sample; restore the point estimate however it exits.

    A Fabric-wrapped optimizer is unwrapped first: the wrapper's class derives from the
    optimizer's, so its own ``sample_()`` would record the sample on the wrapper, where the
    plugin, which knows the optimizer itself, never looks.
    """
    optimizer = unwrap(optimizer)
    optimizer.sample_()
    try:
        yield
    finally:
        optimizer.restore_()


def track(optimizer: PosteriorOptimizer, params: Iterable[Tensor] | None = None) -> None:
    """Make ``optimizer`` the owner of its parameters (or of ``params``).

    A posterior optimizer calls this in ``__init__``; the Trainer's plugin calls it again for
    the optimizers of ``configure_optimizers``. Each parameter keeps a weak reference only:
    ownership never keeps an optimizer alive, and a copied or unpickled parameter is owned by
    no optimizer (``copy.deepcopy(model)``, a teacher or an EMA copy, is never sampled).
    """
    for p in params_of(optimizer) if params is None else params:
        held = getattr(p, _OWNER_ATTR, None)
        if held is None:
            held = _Owners()
            setattr(p, _OWNER_ATTR, held)
        held.claim(optimizer)
    _CLAIMS[0] += 1


def ownership_changes() -> int:
    """A number that grows with every :func:`track` call (ownership can also change when an
    optimizer is garbage-collected: a cache must check its optimizers are alive)."""
    return _CLAIMS[0]


def owner(p: Tensor) -> PosteriorOptimizer | None:
    """The live posterior optimizer that last claimed ``p`` (:func:`track`), else ``None``.

    An optimizer that claimed ``p`` after the one returned but is gone no longer counts."""
    held = getattr(p, _OWNER_ATTR, None)
    return None if held is None else held.latest()


class _Owners:
    """Weak references to the optimizers that claimed a parameter, latest last; a copied or
    unpickled parameter has none."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []

    def claim(self, optimizer: Any) -> None:
        self._refs = [r for r in self._refs if r() is not None and r() is not optimizer]
        self._refs.append(weakref.ref(optimizer))

    def latest(self) -> Any:
        for ref in reversed(self._refs):
            if (optimizer := ref()) is not None:
                return optimizer
        return None

    def __reduce__(self) -> tuple[type, tuple]:
        return _Owners, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Owners:
        return _Owners()
