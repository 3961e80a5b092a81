"""Bayesian model averaging over a posterior optimizer's weights: ``posterior_predict``.

LMD learns a distribution over the weights, and evaluating at the point estimate throws it
away. :func:`posterior_predict` averages the model's predictive *probabilities* over ``S``
posterior samples,

    p(y | x) ~ 1/S * sum_k softmax(f(x; theta_k)),   theta_k ~ q(theta),

as IVON's ``sampled_params`` averaging does. Each ``theta_k`` is drawn exactly as training
draws (``m+ exp(sigma xi+) - m- exp(sigma xi-)`` with the optimizer's own noise kind; LMD's
``sample_(draw=k)``), with its own keys, so the ``S`` draws are independent, reproducible from
the optimizer's state, and disjoint from the training noise. Layers the precision plugin
converted (:class:`~lightning_lowprec.nn.QuantizedLinear`) quantize each sample as they
quantize the weights in training. The point estimate is back in the parameters on every exit,
an exception or Ctrl-C included.

The cost is ``S`` forward passes and one sample write per pass (a pass over the parameters).

Under Fabric the wrapped model's forward would restore the point estimate (an evaluation
forward), so the module inside the wrapper is called directly, inside
:func:`~lightning_lowprec.sampling.drawn_by_caller` (the plugin's forward hook leaves the draws
alone): outside the plugin's dtype context. With ``LowPrecision(autocast="bf16")`` call it
under ``torch.autocast`` to predict in the training dtype.

The Trainer has no optimizer in ``trainer.predict`` (``configure_optimizers`` is not called),
so there is no ``predict`` option: call ``posterior_predict(module, optimizer, batch)`` after
``fit`` with the optimizer it trained (``trainer.optimizers[0]``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowprec.posterior import PosteriorOptimizer, is_posterior
from lightning_lowprec.sampling import drawn_by_caller

__all__ = ["posterior_predict"]


@torch.no_grad()
def posterior_predict(
    model: nn.Module,
    optimizer_or_state: PosteriorOptimizer | Mapping[str, Any],
    inputs: Tensor | tuple[Any, ...],
    samples: int = 16,
) -> Tensor:
    """The posterior predictive: class probabilities averaged over ``samples`` posterior draws.

    Args:
        model: the model (a Fabric-wrapped one is unwrapped); its output is the logits, or has
            a ``.logits`` attribute. It runs in ``eval()`` mode; its mode is restored after.
        optimizer_or_state: the posterior optimizer that trained ``model`` (e.g.
            :class:`~lightning_lowprec.LMD`, or the Lightning/Fabric wrapper around it), or an
            LMD ``state_dict()``; a state dict is loaded into ``LMD(model.parameters())``, so it
            must come from an LMD over one group of ``model.parameters()`` (otherwise rebuild
            the optimizer as in training, ``load_state_dict`` it, and pass it).
        inputs: the model's input, or a tuple of its positional inputs.
        samples: the number of posterior draws ``S`` (>= 1).

    Returns:
        fp32 probabilities of the logits' shape (softmax over the last axis), averaged.

    Raises:
        ValueError: ``samples`` < 1, an optimizer without posterior draws, a state dict that
            does not fit ``LMD(model.parameters())``, or a model whose parameters hold a
            training sample (called between a training forward and its optimizer step).
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}.")
    module = getattr(model, "module", model) if _is_fabric_module(model) else model
    optimizer = _posterior(module, optimizer_or_state)
    if optimizer.holds_sample:
        raise ValueError(
            "The parameters hold a training sample (posterior_predict was called between a "
            "training forward and its optimizer step): predict between steps."
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    training = module.training
    module.eval()
    total: Tensor | None = None
    try:
        with drawn_by_caller():
            for k in range(samples):
                optimizer.sample_(draw=k)
                output = module(*args)
                logits = getattr(output, "logits", output)
                probs = torch.softmax(logits.float(), dim=-1)
                total = probs if total is None else total.add_(probs)
    finally:
        optimizer.restore_()
        module.train(training)
    return total.div_(samples)


def _posterior(model: nn.Module, optimizer_or_state: Any) -> PosteriorOptimizer:
    """The posterior optimizer to sample from (built from a state dict if that is given)."""
    if isinstance(optimizer_or_state, Mapping):
        from lightning_lowprec.optim.lmd import LMD

        optimizer = LMD(model.parameters())
        try:
            optimizer.load_state_dict(optimizer_or_state)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"The state dict does not fit LMD(model.parameters()) ({error}): build the "
                "optimizer as in training, load_state_dict it, and pass the optimizer."
            ) from error
        return optimizer
    inner = getattr(optimizer_or_state, "optimizer", optimizer_or_state)
    if not is_posterior(inner) or "draw" not in inspect.signature(inner.sample_).parameters:
        raise ValueError(
            f"{type(inner).__name__} offers no predictive posterior draws (sample_(draw=k)); "
            "use lightning_lowprec.LMD."
        )
    return inner


def _is_fabric_module(model: nn.Module) -> bool:
    from lightning.fabric.wrappers import _FabricModule

    return isinstance(model, _FabricModule)
