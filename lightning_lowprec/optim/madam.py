"""Madam (Bernstein, Zhao, Meister, Liu, Anandkumar, Yue 2020), the reference ``jxbz/madam``.

Per tensor, at its first step ``max = p_scale * sqrt(mean(p**2))`` (the RMS, not the std).
Every step (``t`` counts this tensor's steps):

    v     = 0.999 * v + 0.001 * g**2
    g_hat = g / sqrt(v / (1 - 0.999**t));  NaN -> 0;  clamp to [-g_bound, g_bound]
    p     = p * exp(-lr * g_hat * sign(p))
    p     = clamp(p, -max, max)

No momentum, no epsilon, no weight decay; beta2 = 0.999 is fixed. Weights that are exactly
zero stay zero forever and signs never flip: the reference scripts avoid zero-initialised
parameters, and here such tensors go to the AdamW rule by default (``adamw="auto"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lowprec.optim import sharded
from lightning_lowprec.optim.base import (
    EXP_SMALL_BOUND,
    AdamWMode,
    CompiledMode,
    LowPrecisionOptimizer,
    NonFiniteMode,
    by_device,
    clamp_where,
    compiled,
    exp_small,
    flat_slices,
    flip_sign,
    require_betas,
    require_range,
    shared_seed,
    slice_batches,
    use_compiled,
    use_foreach,
)

__all__ = ["Madam"]

_BETA2 = 0.999
_MAGNITUDE_BITS = 0x7FFFFFFF
_SIGN_BIT = -(1 << 31)


class Hyper(NamedTuple):
    """One tensor's Madam step, in the form the kernels use. Built once per tensor and step in
    :func:`_hyper`; the eager kernels read the fields as Python floats, the compiled kernel
    gets the same fields as one fp32 tensor (no recompilation when ``lr`` changes) and unpacks
    it by name."""

    neg_lr: Any
    """``-lr``: the step in nats per unit of normalised gradient, negated (the compiled loop
    would spend two instructions per vector negating it)."""
    inv_bias_correction: Any
    """``1 / (1 - 0.999**t)``, ``t`` this tensor's step count."""
    g_bound: Any
    """The clamp on the normalised gradient: ``[-g_bound, g_bound]``."""
    p_max: Any
    """The clamp on the weights, ``[-p_max, p_max]``: ``p_scale`` times the tensor's RMS at its
    first step (``state["max"]``)."""


def _hyper(group: dict[str, Any], state: dict[str, Any]) -> Hyper:
    """The :class:`Hyper` of one tensor (``state``) of ``group`` at its current step."""
    return Hyper(-group["lr"], 1.0 / (1.0 - _BETA2 ** state["step"]), group["g_bound"],
                 state["max"])


def _step_math(p: Tensor, g: Tensor, v: Tensor, h: Hyper) -> None:
    """One Madam step of one slice of a tensor, in place (the eager single-tensor kernel;
    :func:`_foreach_math` mirrors it). The reference's ``NaN -> 0`` can only come from
    ``0 / 0``; it is a ``where`` on the denominator (``x / 0`` for ``x != 0`` gives the
    reference's ``+-g_bound`` after the clamp). Temporaries are reused in place, so a slice
    holds at most three of them (four fp32 copies with bf16 parameters) at once."""
    w = p.float()
    g = g.float()
    v.mul_(_BETA2).add_(g.square().mul_(1.0 - _BETA2))
    denom = (v * h.inv_bias_correction).sqrt_()
    positive = denom > 0
    g_hat = torch.div(g, denom, out=denom)
    torch.where(positive, g_hat, torch.sign(g).mul_(h.g_bound), out=g_hat)
    g_hat.clamp_(-h.g_bound, h.g_bound)
    w.mul_(g_hat.mul_(h.neg_lr).mul_(torch.sign(w)).exp_()).clamp_(-h.p_max, h.p_max)
    if w is not p:
        p.copy_(w)


def _single_tensor(p: Tensor, g: Tensor, v: Tensor, h: Hyper) -> None:
    """One tensor, in :func:`~lightning_lowprec.optim.base.flat_slices` (element-wise, so the
    same values), so its temporaries are a few MiB whatever the tensor's size."""
    for _, (ps, gs, vs) in flat_slices((p, g, v)):
        _step_math(ps, gs, vs, h)


def _foreach_math(ps: list[Tensor], gs: list[Tensor], vs: list[Tensor], hs: list[Hyper]) -> None:
    """:func:`_step_math` over lists with ``torch._foreach_*`` ops (the same arithmetic, bit
    for bit); the :class:`Hyper` records of one group share ``neg_lr`` and ``g_bound``."""
    h = hs[0]
    ws = [p.float() for p in ps]
    gs = [g.float() for g in gs]
    torch._foreach_mul_(vs, _BETA2)
    g2 = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(g2, 1.0 - _BETA2)
    torch._foreach_add_(vs, g2)
    del g2
    denom = torch._foreach_mul(vs, [x.inv_bias_correction for x in hs])
    torch._foreach_sqrt_(denom)
    positive = [d > 0 for d in denom]
    g_hats = torch._foreach_div(gs, denom)
    del denom
    for g, m, g_hat in zip(gs, positive, g_hats, strict=True):
        torch.where(m, g_hat, torch.sign(g).mul_(h.g_bound), out=g_hat)
    del positive
    torch._foreach_clamp_min_(g_hats, -h.g_bound)
    torch._foreach_clamp_max_(g_hats, h.g_bound)
    torch._foreach_mul_(g_hats, h.neg_lr)
    torch._foreach_mul_(g_hats, torch._foreach_sign(ws))
    torch._foreach_exp_(g_hats)
    torch._foreach_mul_(ws, g_hats)
    torch._foreach_clamp_min_(ws, [-x.p_max for x in hs])
    torch._foreach_clamp_max_(ws, [x.p_max for x in hs])
    for p, w in zip(ps, ws, strict=True):
        if w is not p:
            p.copy_(w)


def _multi_tensor(ps: list[Tensor], gs: list[Tensor], vs: list[Tensor], hs: list[Hyper]) -> None:
    """Tensors of one device with ``torch._foreach_*`` ops, in
    :func:`~lightning_lowprec.optim.base.slice_batches`: each temporary list holds at most
    ``STEP_SLICE`` elements."""
    for batch in slice_batches(list(zip(ps, gs, vs, strict=True))):
        bp, bg, bv = (list(t) for t in zip(*(views for _, _, views in batch), strict=True))
        _foreach_math(bp, bg, bv, [hs[i] for i, _, _ in batch])


def _clamp_magnitude(x: Tensor, bound: Tensor) -> Tensor:
    """``x.clamp(-bound, bound)`` for fp32 ``x`` (not NaN) and a 0-d fp32 ``bound >= 0``, as one
    integer ``min`` of the magnitude bits (non-negative floats order as their bit patterns)
    with the sign bit put back. The same values; in the compiled loop it takes 3 vector
    instructions where :func:`~lightning_lowprec.optim.base.clamp_where`'s two ``where`` take
    8 (each a compare into a mask register, a mask-to-vector move, a compare back and a
    masked move), the two clamps were a third of the time of Madam's compiled kernel (measured)."""
    bits = x.view(torch.int32)
    magnitude = torch.minimum(bits & _MAGNITUDE_BITS, bound.view(torch.int32))
    return (magnitude | (bits & _SIGN_BIT)).view(torch.float32)


def _compiled_kernel(p: Tensor, g: Tensor, v: Tensor, hp: Tensor, *, small: bool) -> None:
    """:func:`_step_math` rewritten for one ``torch.compile``'d loop over a whole tensor;
    ``hp`` holds the :class:`Hyper` fields in order (fp32).

    Fewer vector instructions per element, same values: ``g_hat * sign(p)`` is
    ``clamp(g' / denom)`` with ``g' = flip_sign(g, p)`` (exact, as ``sign(p) = +-1`` and where
    ``p == 0`` any finite factor leaves ``p`` at zero; Inductor spells ``sign`` with eight
    instructions), the reference's ``NaN -> 0``, which only ``g == 0`` can produce, is a
    ``where`` on ``g``, and the clamps are :func:`_clamp_magnitude` (the gradient's NaN is
    replaced after it). With ``small`` (``lr * g_bound <= EXP_SMALL_BOUND``, which bounds
    every exponent) the exponential is :func:`exp_small` (within 0.71 ulp) instead of a SLEEF
    call, otherwise ``torch.exp``, whose overflow (``lr * g_bound > 88``) can make
    ``0 * inf = NaN``, so the weights' clamp there is :func:`clamp_where`, which keeps a NaN.
    """
    h = Hyper(*hp.unbind())
    w = p.float()
    g = g.float()
    v.mul_(_BETA2).add_(g.square().mul_(1.0 - _BETA2))
    denom = (v * h.inv_bias_correction).sqrt_()
    step = _clamp_magnitude(flip_sign(g / denom, w), h.g_bound).mul_(h.neg_lr)
    step = torch.where(g == 0, 0.0, step)
    if small:
        w_new = _clamp_magnitude(w * exp_small(step), h.p_max)
    else:
        w_new = clamp_where(w * torch.exp(step), -h.p_max, h.p_max)
    p.copy_(w_new)


def _validate(g: dict[str, Any]) -> None:
    """Check the Madam hyperparameters of a group (see :class:`Madam` for the ranges) but
    ``adamw``, ``seed``, ``foreach`` and ``compiled``, which the base class checks."""
    inf = math.inf
    require_range("lr", g["lr"], 0.0, inf)  # 0 as torch: schedules reach it
    require_range("p_scale", g["p_scale"], 0.0, inf, low_open=True)
    require_range("g_bound", g["g_bound"], 0.0, inf, low_open=True)
    require_range("adamw_lr_ratio", g["adamw_lr_ratio"], 0.0, inf)
    require_betas("adamw_betas", g["adamw_betas"])
    require_range("eps", g["eps"], 0.0, inf)
    require_range("weight_decay", g["weight_decay"], 0.0, inf)


class Madam(LowPrecisionOptimizer):
    """Madam with the reference semantics (module doc), plus the shared conveniences.

    Beyond the reference: a ``foreach`` path and a ``compiled`` path (same arithmetic up to
    an ulp of the exponential, see :func:`_compiled_kernel`);
    ``v`` is fp32 for bf16 parameters (an EMA with 0.999 stalls in bf16) and the update is
    computed in fp32, then rounded into the parameter; a non-finite gradient skips the
    tensor's step (the reference would let an inf into ``v`` and freeze the tensor) and counts
    in ``optimizer.skipped_steps``; ``adamw="auto"`` (default) sends 1-D tensors (norm
    weights, biases) and all-zero tensors, which Madam can never move, to an AdamW rule
    (learning rate ``adamw_lr_ratio * lr``, ``adamw_betas``, ``eps``, ``weight_decay``; these four
    apply only to that rule; it rounds into bf16 and fp16 parameters stochastically, from
    ``seed``). ``adamw="never"`` is the reference on every tensor.

    Args:
        params: parameters or parameter groups (every argument below may be set per group).
        lr: multiplicative step in nats per step (>= 0); the reference default 0.01.
        p_scale: clamp bound as a multiple of each tensor's initial RMS (> 0).
        g_bound: clamp on the normalised gradient (> 0).
        adamw: ``"auto"``, ``"always"`` or ``"never"``.
        adamw_lr_ratio: the AdamW rule's learning rate as a multiple of ``lr`` (>= 0).
        adamw_betas: the AdamW rule's ``(beta1, beta2)``, each in [0, 1) (not ``betas``, which
            torch's ``OneCycleLR`` / ``CyclicLR`` would cycle as if it were Madam's momentum;
            Madam has none, so they refuse ``cycle_momentum=True``).
        eps: the AdamW rule's epsilon (>= 0).
        weight_decay: the AdamW rule's decoupled weight decay (>= 0).
        seed: base of the AdamW rule's stochastic rounding into bf16 and fp16 parameters;
            ``None`` draws one from torch's global generator, broadcast from rank 0 under
            ``torch.distributed`` (:func:`~lightning_lowprec.optim.base.shared_seed`).
        foreach: the eager kernels' batching: ``True`` ``torch._foreach_*`` ops, ``False`` one
            tensor at a time, ``None`` torch's rule (batched on CUDA only;
            :func:`~lightning_lowprec.optim.base.use_foreach`).
        compiled: ``"auto"`` (default) runs each tensor's update as one ``torch.compile``'d
            kernel wherever :func:`~lightning_lowprec.optim.base.compile_works`, else the
            eager kernels after one warning; ``True`` always, ``False`` never.
        nonfinite: ``"skip"`` (default) skips the update of a parameter whose gradient is not
            finite, with a rate-limited warning naming it; ``"raise"`` raises
            ``FloatingPointError`` naming it, before any weight or state changes.
    """

    _validate_group = staticmethod(_validate)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        p_scale: float = 3.0,
        g_bound: float = 10.0,
        *,
        adamw: AdamWMode = "auto",
        adamw_lr_ratio: float = 0.3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int | None = None,
        foreach: bool | None = None,
        compiled: CompiledMode = "auto",
        nonfinite: NonFiniteMode = "skip",
    ) -> None:
        seed = shared_seed(seed)
        defaults = dict(
            lr=lr, p_scale=p_scale, g_bound=g_bound, adamw=adamw,
            adamw_lr_ratio=adamw_lr_ratio, adamw_betas=adamw_betas, eps=eps,
            weight_decay=weight_decay, seed=seed, foreach=foreach, compiled=compiled,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if state["adamw"]:
            self._init_adamw_state(p, state)
            return
        state["max"] = group["p_scale"] * math.sqrt(sharded.mean_square(p))
        state["exp_avg_sq"] = torch.zeros_like(
            p, dtype=torch.float32, memory_format=torch.contiguous_format
        )

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Dispatch: :func:`_compiled_kernel` per tensor for ``compiled`` groups, else
        :func:`_multi_tensor` (``foreach``) per device or :func:`_single_tensor`."""
        states = [self.state[p] for p in params]
        hs = [_hyper(group, s) for s in states]
        args = [(p, p.grad, s["exp_avg_sq"]) for p, s in zip(params, states, strict=True)]
        device = params[0].device
        if use_compiled(group, device):
            fn = compiled(_compiled_kernel)
            small = group["lr"] * group["g_bound"] <= EXP_SMALL_BOUND
            table = torch.tensor(hs, dtype=torch.float32, device=device)
            for i, (p, g, v) in enumerate(args):
                fn(p, g, v, table[i].to(p.device), small=small)
        elif use_foreach(group, device):
            for idx in by_device(params):
                _multi_tensor(*(list(c) for c in zip(*(args[i] for i in idx), strict=True)),
                              [hs[i] for i in idx])
        else:
            for a, h in zip(args, hs, strict=True):
                _single_tensor(*a, h)
