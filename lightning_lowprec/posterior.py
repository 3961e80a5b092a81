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

A posterior optimizer also calls :func:`track` on itself when it is built. Fabric shows a
precision plugin no optimizer before the optimizer's first ``step()``, but the first training
forward already needs the sample, so Fabric's plugin finds the posterior optimizers of the
model it set up among the tracked ones (by their parameters; weak references only).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

__all__ = ["PosteriorOptimizer", "is_posterior", "sampled_params", "track", "tracked"]

_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


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


def is_posterior(optimizer: object) -> bool:
    """Whether ``optimizer`` (or the optimizer a Lightning/Fabric wrapper holds) is one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, PosteriorOptimizer)


@contextmanager
def sampled_params(optimizer: PosteriorOptimizer) -> Iterator[None]:
    """Run the block at this step's sample; restore the point estimate however it exits."""
    optimizer.sample_()
    try:
        yield
    finally:
        optimizer.restore_()


def track(optimizer: PosteriorOptimizer) -> None:
    """Let Fabric's plugin find ``optimizer`` (a posterior optimizer calls this in ``__init__``).

    Only a weak reference is kept: tracking never keeps an optimizer alive.
    """
    _TRACKED.add(optimizer)


def tracked() -> list[PosteriorOptimizer]:
    """The posterior optimizers alive in this process, in no particular order."""
    return list(_TRACKED)
