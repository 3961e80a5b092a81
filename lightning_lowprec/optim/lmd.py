"""LMD: log-normal multiplicative dynamics (arXiv 2506.17768), as reconstructed in RESEARCH.md §1.

Each weight is the difference of two positive log-normal variables (the EG± trick),
``theta = m+ * eps+ - m- * eps-`` with ``eps± = exp(sigma * xi±)``, ``xi± ~ N(0, 1)``. The
optimizer keeps the log-medians ``l± = log m±`` and moves them multiplicatively:

    g     = dloss/dtheta at the sampled theta
    c     = sign(u),  u <- momentum * u + (1 - momentum) * g       (gradient only)
    l+   <- l+ - lr * ( c + weight_decay * (l+ - log m_ref))
    l-   <- l- - lr * (-c + weight_decay * (l- - log m_ref))       (regulariser decoupled)
    l±   <- clamp(l±, log m_ref - 1/weight_decay, log m_ref + 1/weight_decay)

``c`` is the sign of ``u+ = EMA(g * theta+)`` for ``m+`` and of ``u- = EMA(-g * theta-)`` for
``m-``; ``theta± > 0`` only reweights each term of the EMA (by the sample's ``exp(sigma * xi)``
and the slowly moving median), so one shared momentum of ``g`` gives nearly the same signs
for one tensor instead of two (the default; ``separate_momentum=True`` keeps ``u±`` exactly).
They differ where the momentum is near zero: 2.8 % of the elements per step (a 32-64-1 MLP
trained at samples, ``sigma=0.05``, 300 steps; measured). The decay pulls every median to ``m_ref``
and keeps it inside ``[m_ref * e**(-1/weight_decay), m_ref * e**(+1/weight_decay)]`` whenever
``lr * weight_decay <= 1`` (the clamp makes that exact in floating point and under any
schedule); medians stay positive, so weights never stick at zero and their signs can flip.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_lowprec.optim import counter_rng, sharded
from lightning_lowprec.optim.base import (
    EXP_NORMAL_RANGE,
    STEP_SLICE,
    AdamWMode,
    CompiledMode,
    LowPrecisionOptimizer,
    NonFiniteMode,
    by_device,
    clamp_where,
    compiled,
    ema_,
    exp_normal,
    flat_slices,
    require,
    require_betas,
    require_range,
    shared_seed,
    shifted,
    slice_batches,
    use_compiled,
    use_foreach,
)
from lightning_lowprec.optim.counter_rng import (
    NOISE_KINDS,
    NoiseKind,
    derive_keys,
    fold_high,
    normal_pair,
)
from lightning_lowprec.optim.spare import Spare
from lightning_lowprec.posterior import sampled_params, track

__all__ = ["INITS", "LMD", "LogMedians"]

Init = Literal["from_weights", "moment_matched", "abs_pair"]
INITS: tuple[str, ...] = ("from_weights", "moment_matched", "abs_pair")
_PURPOSE_SAMPLE = 1
_PURPOSE_INIT = 2
_PURPOSE_PREDICT = 3
_ABS_PAIR_FLOOR = 1e-5
"""The precursor code's floor under ``|w|`` (absolute, as there)."""
_EAGER_CHUNK = 1 << 17
"""Elements per chunk of an eager sample (a power of two, at most ``2**30``): its ~60 integer
and float passes then run on buffers of 1 MiB that stay in the caches instead of streaming
the whole tensor through memory each time. Per element of a 4M-element tensor, one CPU core,
loaded machine: 12.9 ns at ``2**17`` against 14.4 at ``2**16`` and 12.2 at ``2**19``
(measured; the values are the same at any size)."""
_NOISE_BOUND = 6.0
"""``|xi| < 6`` for both noise kinds (Irwin-Hall ``<= 3.46``, Box-Muller ``<= 5.77``)."""


def _sign_update(
    u: Tensor, v: Tensor, w_momentum: Any, w_sign: Any, interp: bool, low_weight: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Advance ``u`` toward ``v``; return the sign that drives the update (``low_weight``: see
    :func:`ema_`; ``out``: where to write it, else a new tensor)."""
    if interp:
        c = torch.lerp(u, v, w_sign, out=out).sign_()
        ema_(u, v, w_momentum, low_weight)
        return c
    ema_(u, v, w_momentum, low_weight)
    return torch.sign(u, out=out)


def _exp_in_range(group: dict[str, Any], log_m_ref: float) -> bool:
    """Whether every exponent of a tensor's sample, update and point estimate is in
    ``EXP_NORMAL_RANGE``: the decay keeps log-medians within ``log_m_ref +- 1/weight_decay``
    and the noise adds less than ``6 sigma``. Always true at the defaults (about +-11 nats
    around ``log m0``)."""
    if group["weight_decay"] <= 0:
        return False
    half = 1.0 / group["weight_decay"] + _NOISE_BOUND * group["sigma"]
    low, high = EXP_NORMAL_RANGE
    return low <= log_m_ref - half and log_m_ref + half <= high


def _exp_(x: Tensor, inline: bool, guard: bool = False) -> Tensor:
    """``exp`` of the temporary ``x``: in place, or :func:`exp_normal` where ``inline`` (the
    compiled path, when :func:`_exp_in_range` holds). ``guard`` clamps ``x`` into the range
    first, for stored log-medians: they were clamped with the ``weight_decay`` of their last
    update, and one raised since could leave them outside what :func:`_exp_in_range` assumed."""
    if not inline:
        return x.exp_()
    return exp_normal(x.clamp(*EXP_NORMAL_RANGE) if guard else x)


def _sample_tensor(
    p: Tensor, lp: Tensor, ln: Tensor, keys: Tensor, sigma: Any, noise: str,
    offset: int | Tensor | None = None, *, inline: bool = False,
) -> None:
    """Write ``m+ exp(sigma xi+) - m- exp(sigma xi-)`` into ``p`` (noise from ``keys``; a
    chunk or shard starting at element ``offset`` of the whole tensor takes that slice of the
    tensor's noise, see :func:`~lightning_lowprec.optim.counter_rng.random_words`)."""
    xp, xn = normal_pair(lp.numel(), keys, noise, offset)
    theta_pos = _exp_(xp.view_as(lp).mul_(sigma).add_(lp), inline, guard=True)
    p.copy_(theta_pos.sub_(_exp_(xn.view_as(ln).mul_(sigma).add_(ln), inline, guard=True)))


def _sample_chunked(
    p: Tensor, lp: Tensor, ln: Tensor, keys: Tensor, sigma: float, noise: str, offset: int = 0
) -> None:
    """:func:`_sample_tensor`, eagerly, in chunks of at most ``_EAGER_CHUNK`` elements (same
    values, bit for bit; ``p`` may be a shard that begins at element ``offset`` of its
    tensor). Irwin-Hall noise (the default) goes through
    :func:`~lightning_lowprec.optim.counter_rng.irwin_hall_pair_` into two buffers allocated
    once per tensor, both streams of a chunk in one pass each; chunks end at multiples of
    ``_EAGER_CHUNK`` of the tensor's element index, so none crosses a multiple of ``2**30``."""
    tensors = (p, lp, ln)
    if noise != "irwin_hall" or not all(t.is_contiguous() for t in tensors):
        if not p.is_contiguous() or p.numel() <= _EAGER_CHUNK:
            _sample_tensor(p, lp, ln, keys, sigma, noise, offset)
            return
        flat, fp, fn = p.view(-1), lp.view(-1), ln.view(-1)
        for a in range(0, flat.numel(), _EAGER_CHUNK):
            b = a + _EAGER_CHUNK
            _sample_tensor(flat[a:b], fp[a:b], fn[a:b], keys, sigma, noise, offset + a)
        return
    flat, fp, fn = (t.view(-1) for t in tensors)
    size = min(flat.numel(), _EAGER_CHUNK)
    xi = torch.empty(2, size, dtype=torch.float32, device=p.device)
    work = torch.empty(2, size, dtype=torch.int32, device=p.device)
    a = 0
    while a < flat.numel():
        b = min(flat.numel(), a + _EAGER_CHUNK - (offset + a) % _EAGER_CHUNK)
        x = counter_rng.irwin_hall_pair_(xi[:, : b - a], keys, offset + a, work[:, : b - a])
        x.mul_(sigma)
        x[0].add_(fp[a:b])
        x[1].add_(fn[a:b])
        x.exp_()
        if flat.dtype == torch.float32:
            torch.sub(x[0], x[1], out=flat[a:b])
        else:
            flat[a:b].copy_(x[0].sub_(x[1]))
        a = b


def _point_estimate_tensor(
    p: Tensor, lp: Tensor, ln: Tensor, scale: Any, mean: bool, *, inline: bool = False,
    guard: bool = False,
) -> None:
    """Write ``m+ - m-`` (times ``scale = exp(sigma**2 / 2)`` for ``mean``) into ``p``.

    Eagerly, the same values in four passes and one temporary instead of seven and three:
    the first ``exp`` writes into an fp32 ``p`` directly (no clones, no final copy)."""
    if inline:
        theta = _exp_(lp.clone(), inline, guard).sub_(_exp_(ln.clone(), inline, guard))
        p.copy_(theta * scale if mean else theta)
        return
    theta = torch.exp(lp, out=p) if p.dtype == torch.float32 and p.is_contiguous() else lp.exp()
    theta.sub_(torch.exp(ln))
    if mean:
        theta.mul_(scale)
    if theta is not p:
        p.copy_(theta)


class Hyper(NamedTuple):
    """One tensor's LMD step (see the module doc), in the form the kernels use. Built once per
    tensor and step by :func:`_hyper`; the compiled kernel gets the same fields as one fp32
    tensor (no recompilation when ``lr`` or the bounds change) and unpacks it by name."""

    lr: Any
    """The step, in nats."""
    w_momentum: Any
    """``1 - momentum``: the momentum EMA's weight of the new gradient."""
    w_sign: Any
    """``1 - sign_beta``: the gradient's weight in Lion's sign (1 without ``sign_beta``)."""
    weight_decay: Any
    log_m_ref: Any
    """``log m_ref`` of the tensor, where the decay pulls both log-medians."""
    low: Any
    """``log m_ref - 1/weight_decay`` (``-inf`` without decay): the clamp's lower bound."""
    high: Any
    """``log m_ref + 1/weight_decay`` (``+inf`` without decay)."""
    sigma: Any
    """The sampling noise's log-std (the sample the update follows, ``separate_momentum``)."""
    scale: Any
    """The point estimate's factor: ``exp(sigma**2 / 2)`` for ``point_estimate="mean"``."""


def _hyper(group: dict[str, Any], state: dict[str, Any]) -> Hyper:
    """The :class:`Hyper` record of one tensor (``state``) of ``group`` for its next step."""
    half = 1.0 / group["weight_decay"] if group["weight_decay"] > 0 else math.inf
    sign_beta = group["sign_beta"]
    lmr = state["log_m_ref"]
    return Hyper(
        lr=group["lr"], w_momentum=1.0 - group["momentum"],
        w_sign=1.0 - (sign_beta if sign_beta is not None else 0.0),
        weight_decay=group["weight_decay"], log_m_ref=lmr, low=lmr - half, high=lmr + half,
        sigma=group["sigma"], scale=_scale(group)[0],
    )


class _Scratch:
    """The eager single-tensor kernel's fp32 temporaries, allocated once per step at the
    largest slice's size and reused by every slice. On CPU fresh MiB-sized temporaries can
    cost more (in page faults) than the passes over them: one 2^18-element slice of the step
    took 3-4.5 ms with new temporaries against 1 ms with these in rounds of 5 calls, 1.2 ms
    against 1.0 in rounds of 20 (one thread, measured)."""

    def __init__(self, numel: int, device: torch.device) -> None:
        slots = torch.empty(_SCRATCH_SLOTS, numel, dtype=torch.float32, device=device)
        self._slots = slots.unbind()
        self._views: dict[tuple[int, torch.Size], Tensor] = {}

    def __call__(self, slot: int, like: Tensor) -> Tensor:
        """Temporary ``slot`` shaped like ``like`` (its values undefined); the view is made
        once per shape, not three dispatcher calls per temporary and slice."""
        key = (slot, like.shape)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._slots[slot][: like.numel()].view(like.shape)
        return view


_SCRATCH_SLOTS = 5


def _no_scratch(slot: int, like: Tensor) -> None:
    """The compiled kernel's "scratch": ``out=None``, a new tensor, which Inductor fuses away."""


def _update_math(
    p: Tensor, g: Tensor, lp: Tensor, ln: Tensor, up: Tensor, un: Tensor | None,
    keys: Tensor | None, h: Hyper, *, separate: bool, interp: bool, drawn: bool, noise: str,
    mean: bool, inline: bool = False, low_weight: bool = False, offset: Any = None,
    work: _Scratch | None = None,
) -> None:
    """One LMD update of one tensor (or slice), then the point estimate into ``p``.

    Run eagerly on each slice by :func:`_single_tensor` (``work``: its reused temporaries)
    and as the compiled kernel (:func:`_compiled_kernel`, ``work=None``) on whole tensors,
    whose micro-optimisations the flags turn on: ``inline`` (when :func:`_exp_in_range`) the
    exponentials of :func:`_exp_` and the clamp as
    :func:`~lightning_lowprec.optim.base.clamp_where`; ``low_weight`` (``1 - momentum < 0.5``)
    the EMAs as in :func:`~lightning_lowprec.optim.base.ema_`. ``separate``: the two momenta
    ``u± = EMA(±g theta±)`` at the sample (``drawn``: redrawn from ``keys``, ``noise`` and
    ``offset``, see :func:`_sample_tensor`) or at the medians; else one shared momentum of
    ``g``. ``interp``: Lion's sign (``sign_beta``). ``mean``: scale the point estimate.
    """
    tmp = work or _no_scratch
    g = g.float() if work is None or g.dtype == torch.float32 else tmp(0, g).copy_(g)
    if separate:
        if drawn:
            xp, xn = normal_pair(lp.numel(), keys, noise, offset)
            tp = _exp_(xp.view_as(lp).mul_(h.sigma).add_(lp), inline, guard=True)
            tn = _exp_(xn.view_as(ln).mul_(h.sigma).add_(ln), inline, guard=True)
        elif inline:
            tp, tn = _exp_(lp, True, guard=True), _exp_(ln, True, guard=True)
        else:
            tp, tn = torch.exp(lp, out=tmp(1, lp)), torch.exp(ln, out=tmp(2, ln))
        cp = _sign_update(up, tp.mul_(g), h.w_momentum, h.w_sign, interp, low_weight,
                          out=tmp(3, lp))
        cn = _sign_update(un, tn.mul_(g).neg_(), h.w_momentum, h.w_sign, interp, low_weight,
                          out=tmp(4, ln))
    else:
        cp = _sign_update(up, g, h.w_momentum, h.w_sign, interp, low_weight, out=tmp(3, lp))
        cn = None  # -cp: subtracted below instead of added (the same values, one pass less)
    for log_m, c in ((lp, cp), (ln, cn)):
        t = torch.sub(log_m, h.log_m_ref, out=tmp(1, log_m)).mul_(h.weight_decay)
        t = t.add_(c) if c is not None else t.sub_(cp)
        log_m.sub_(t.mul_(h.lr))
        if inline:
            log_m.copy_(clamp_where(log_m, h.low, h.high))
        else:
            log_m.clamp_(h.low, h.high)
    if work is None:
        _point_estimate_tensor(p, lp, ln, h.scale, mean, inline=inline)
        return
    # Eagerly, _point_estimate_tensor's values in three passes instead of six: no clones,
    # and the last operation writes into an fp32 ``p`` (a bf16 one takes the fp32 result).
    theta, theta_neg = torch.exp(lp, out=tmp(1, lp)), torch.exp(ln, out=tmp(2, ln))
    target = p if p.dtype == torch.float32 else theta
    if mean:
        torch.mul(theta.sub_(theta_neg), h.scale, out=target)
    else:
        torch.sub(theta, theta_neg, out=target)
    if target is not p:
        p.copy_(target)


def _compiled_kernel(
    p: Tensor, g: Tensor, lp: Tensor, ln: Tensor, up: Tensor, un: Tensor | None,
    keys: Tensor | None, hp: Tensor, **flags: Any,
) -> None:
    """:func:`_update_math` as one ``torch.compile``'d kernel (through
    :func:`~lightning_lowprec.optim.base.compiled`); ``hp`` holds the :class:`Hyper` fields in
    order."""
    _update_math(p, g, lp, ln, up, un, keys, Hyper(*hp.unbind()), **flags)


def _single_tensor(
    p: Tensor, g: Tensor, lp: Tensor, ln: Tensor, up: Tensor, un: Tensor | None,
    keys: Tensor | None, h: Hyper, *, offset: Tensor | None = None, work: _Scratch,
    **flags: Any,
) -> None:
    """:func:`_update_math`, eagerly, on the :func:`~lightning_lowprec.optim.base.flat_slices`
    of one tensor: the same values (a slice takes its part of the tensor's noise, see
    :func:`~lightning_lowprec.optim.base.shifted`) with a few MiB of temporaries (``work``)
    instead of up to 32 bytes per element, and each slice's passes run in cache."""
    for start, (ps, gs, lps, lns, ups, uns) in flat_slices((p, g, lp, ln, up, un)):
        _update_math(ps, gs, lps, lns, ups, uns, keys, h, offset=shifted(offset, start),
                     work=work, **flags)


def _slice_numel(row: tuple[Tensor | None, ...]) -> int:
    """The most elements that one :func:`~lightning_lowprec.optim.base.flat_slices` slice of
    a tensor's ``row`` (its parameter, gradient and states) holds."""
    n = row[0].numel()
    return min(n, STEP_SLICE) if all(t is None or t.is_contiguous() for t in row) else n


def _multi_tensor(
    ps: list[Tensor], gs: list[Tensor], lps: list[Tensor], lns: list[Tensor],
    ups: list[Tensor], uns: list[Tensor] | None, keys: list[Tensor | None], hs: list[Hyper],
    offsets: list[Tensor | None], **flags: Any,
) -> None:
    """Tensors of one device with ``torch._foreach_*`` ops (:func:`_foreach_math`), in
    :func:`~lightning_lowprec.optim.base.slice_batches`: each temporary list holds at most
    ``STEP_SLICE`` elements, whatever the tensors' sizes."""
    rows = list(zip(ps, gs, lps, lns, ups, uns or [None] * len(ps), strict=True))
    for batch in slice_batches(rows):
        views = [list(t) for t in zip(*(v for _, _, v in batch), strict=True)]
        _foreach_math(
            *views, [keys[i] for i, _, _ in batch],
            [shifted(offsets[i], start) for i, start, _ in batch],
            [hs[i] for i, _, _ in batch], **flags,
        )


def _foreach_math(
    ps: list[Tensor], gs: list[Tensor], lps: list[Tensor], lns: list[Tensor],
    ups: list[Tensor], uns: list[Tensor | None], keys: list[Tensor | None],
    offsets: list[Any], hs: list[Hyper], *, separate: bool, interp: bool, drawn: bool,
    noise: str, mean: bool,
) -> None:
    """:func:`_update_math` over one batch of views (of at most ``STEP_SLICE`` elements in
    all) with ``torch._foreach_*`` ops: the same arithmetic, bit for bit. The records of one
    group differ only in their per-tensor fields (``log_m_ref``, ``low``, ``high``)."""
    h = hs[0]
    lmrs, lows, highs = [x.log_m_ref for x in hs], [x.low for x in hs], [x.high for x in hs]
    gs = [g.float() for g in gs]

    def signs(us: list[Tensor], vs: list[Tensor]) -> list[Tensor]:
        if interp:
            cs = torch._foreach_lerp(us, vs, h.w_sign)
            torch._foreach_sign_(cs)
            torch._foreach_lerp_(us, vs, h.w_momentum)
            return cs
        torch._foreach_lerp_(us, vs, h.w_momentum)
        return torch._foreach_sign(us)

    if separate:
        if drawn:
            tps, tns = [], []
            for lp, ln, k, o in zip(lps, lns, keys, offsets, strict=True):
                xp, xn = normal_pair(lp.numel(), k, noise, o)
                tps.append(xp.view_as(lp).mul_(h.sigma).add_(lp).exp_())
                tns.append(xn.view_as(ln).mul_(h.sigma).add_(ln).exp_())
        else:
            tps, tns = torch._foreach_exp(lps), torch._foreach_exp(lns)
        torch._foreach_mul_(tps, gs)
        torch._foreach_mul_(tns, gs)
        torch._foreach_neg_(tns)
        cps = signs(ups, tps)
        cns = signs(uns, tns)
    else:
        cps = signs(ups, gs)
        cns = None  # -cps, as in _update_math
    for log_ms, cs in ((lps, cps), (lns, cns)):
        ts = torch._foreach_sub(log_ms, lmrs)
        torch._foreach_mul_(ts, h.weight_decay)
        if cs is not None:
            torch._foreach_add_(ts, cs)
        else:
            torch._foreach_sub_(ts, cps)
        torch._foreach_mul_(ts, h.lr)
        torch._foreach_sub_(log_ms, ts)
        torch._foreach_clamp_min_(log_ms, lows)
        torch._foreach_clamp_max_(log_ms, highs)
    thetas, theta_negs = torch._foreach_exp(lps), torch._foreach_exp(lns)
    if mean:
        torch._foreach_sub_(thetas, theta_negs)
    # The last operation writes into each fp32 parameter (one pass less than a copy).
    for p, theta, theta_neg in zip(ps, thetas, theta_negs, strict=True):
        target = p if p.dtype == torch.float32 else theta
        if mean:
            torch.mul(theta, h.scale, out=target)
        else:
            torch.sub(theta, theta_neg, out=target)
        if target is not p:
            p.copy_(target)


class LogMedians(NamedTuple):
    """One LMD tensor's log-medians and soft-clip bounds, in nats (see :meth:`LMD.log_medians`)."""

    pos: Tensor
    """``log m+`` (fp32): the optimizer's own state, to read, never to write."""
    neg: Tensor
    """``log m-`` (fp32), likewise."""
    log_m_ref: float
    """``log m_ref``, where the decay pulls both."""
    low: float
    """``log m_ref - 1/weight_decay`` (``-inf`` without decay)."""
    high: float
    """``log m_ref + 1/weight_decay`` (``+inf`` without decay)."""


def _validate(g: dict[str, Any]) -> None:
    """Check the LMD hyperparameters of a group (see :class:`LMD` for the ranges) but
    ``adamw``, ``seed``, ``foreach`` and ``compiled``, which the base class checks."""
    inf = math.inf
    require_range("lr", g["lr"], 0.0, inf)  # 0 as torch: schedules reach it
    require_range("momentum", g["momentum"], 0.0, 1.0, high_open=True)
    require_range("sigma", g["sigma"], 0.0, 1.0)
    require_range("weight_decay", g["weight_decay"], 0.0, inf)
    require_range("lr * weight_decay", g["lr"] * g["weight_decay"], 0.0, 1.0)
    require_range("m_ref", g["m_ref"], 0.0, inf, low_open=True)
    require(g["init"] in INITS, "init", g["init"], f"one of {INITS}")
    require_range("init_sigma", g["init_sigma"], 0.0, 3.0, low_open=True)
    if g["sign_beta"] is not None:
        require_range("sign_beta", g["sign_beta"], 0.0, 1.0, high_open=True)
    require(isinstance(g["separate_momentum"], bool), "separate_momentum",
            g["separate_momentum"], "a bool")
    require(g["point_estimate"] in ("median", "mean"), "point_estimate", g["point_estimate"],
            "'median' or 'mean'")
    require(g["noise"] in NOISE_KINDS, "noise", g["noise"], f"one of {NOISE_KINDS}")
    require_range("adamw_lr_ratio", g["adamw_lr_ratio"], 0.0, inf)
    require_betas("adamw_betas", g["adamw_betas"])
    require_range("eps", g["eps"], 0.0, inf)


class LMD(LowPrecisionOptimizer):
    """Log-normal multiplicative dynamics: a posterior optimizer with multiplicative updates.

    **What the parameters hold.** Between steps, the *point estimate* ``m+ - m-`` (the median
    of the posterior's ``theta``; ``point_estimate="mean"`` scales it by ``exp(sigma**2/2)``,
    the posterior mean). :meth:`sample_` writes a draw ``theta`` into them, :meth:`restore_`
    writes the point estimate back, and :meth:`step` computes the update from the gradient
    and leaves the new point estimate. Noise injection therefore needs a sample before the
    forward pass: the plugin draws one per optimizer step (shared by the micro-batches of
    gradient accumulation); without the plugin, pass a closure to ``step`` (it runs at the
    sample: Lightning's automatic optimisation does this) or wrap forward and backward in
    ``with optimizer.sampled_params():``. A plain ``loss.backward(); optimizer.step()`` (e.g.
    LitGPT alone) takes the gradient at the point estimate: correct, but without noise
    (``sigma`` then only matters through ``point_estimate="mean"``).

    **Sampling is reproducible**: the noise of update ``t`` of parameter ``i`` is a pure
    function of ``(seed, i, t)`` (:mod:`~lightning_lowprec.optim.counter_rng`), so every DDP
    rank with the same ``seed`` draws the same sample, every micro-batch of a step sees the
    same sample, and a run resumed from ``state_dict()`` continues with the same noise.

    **Initialisation** (``init``), at a parameter's first use, from the weights ``w`` it holds:
    with ``s = RMS(w)`` and ``m0 = s / sqrt(2 e^{s0^2} (e^{s0^2} - 1))`` (``s0 = init_sigma``;
    ``m0 = 1.17 s`` at the default 0.5), which is the median for which two independent
    ``m0 * exp(s0 * zeta)`` differ by a standard deviation ``s``:

    * ``"from_weights"`` (default): ``m± = (sqrt(w^2 + 4 m0^2) ± w) / 2``, so ``m+ - m- = w``
      and ``m+ m- = m0^2`` (in fp32 up to rounding: ``|m+ - m- - w| <= 7.5e-7 RMS(w)``, about
      5 ulps of ``m0``, measured); with ``point_estimate="mean"`` the medians target
      ``w / exp(sigma^2 / 2)``, so the mean ``exp(sigma^2/2) (m+ - m-)`` is ``w``. The model
      keeps its own initialisation (or its pretrained weights, which makes fine-tuning work at
      all), nothing random is drawn, and the medians sit at the scale ``m0`` that the measured
      defaults assume.
    * ``"moment_matched"``: a fresh draw ``m± = m0 * exp(s0 * zeta±)``, which replaces the
      weights by another random init of the same RMS (RESEARCH.md §1, scheme b). From scratch
      only; ``init_sigma`` must not be as small as ``sigma`` (``s0 = 0.05`` gives
      ``m0 = 14 s`` and the norm blows up, measured).
    * ``"abs_pair"``: the precursor code's ``m± = |w±| + 1e-5`` for two independent normal
      draws ``w±`` of std ``s`` (scheme a). From scratch only.

    A tensor that is all zero (only reachable with ``adamw="never"``) uses
    ``s = 1 / sqrt(fan_in)`` instead. Medians start clamped into the bounds below. Measured
    from scratch (RESEARCH.md's char-level 2x128 LitGPT, 300 steps, 6 paired seeds), the two
    main schemes train alike: validation loss 2.063 (``from_weights``) vs 2.064
    (``moment_matched``), paired difference 0.001 +- 0.009; and one shared momentum did as
    well as ``u±`` (3 seeds: 2.073 vs 2.077).

    **Defaults** are the working settings measured in RESEARCH.md §1: ``lr=1e-2``,
    ``sigma=0.05``, ``weight_decay=0.1``, ``m_ref=1`` (= ``m0`` of each tensor),
    ``momentum=0.9``. A step moves a weight by about ``lr * m``, so what transfers between
    models is ``lr * m0 / s ~ 0.01`` (``lr ~ 0.0085`` at ``init_sigma=0.5``): if you change
    ``init_sigma`` (hence ``m0 / s``), rescale ``lr`` to keep that product.

    **Which tensors** (``adamw``): ``"auto"`` (default) sends 1-D tensors (norm weights,
    biases) and tensors that are all zero at their first step to the internal AdamW rule
    (learning rate ``adamw_lr_ratio * lr``, ``adamw_betas``, ``eps``, decoupled ``weight_decay``;
    stochastic rounding from ``seed`` into bf16 and fp16 parameters), everything else to LMD;
    ``"always"`` / ``"never"`` force one rule for a group. This is what
    LitGPT's flat ``model.parameters()`` needs; with names, use
    :func:`lightning_lowprec.optim.param_groups` to also put embeddings on AdamW.

    **Memory** (fp32 state regardless of the parameter dtype): log-medians ``l+``, ``l-`` and
    one momentum, 12 bytes per parameter, i.e. AdamW's 8 plus one parameter-sized tensor;
    ``separate_momentum=True`` adds another 4. Sampled under gradient accumulation, each
    sampled tensor also gets a spare buffer of its own dtype (4 bytes per fp32 parameter, not
    part of ``state_dict``) from its first redraw within a step, so that the sample is drawn
    once per optimizer step (:mod:`~lightning_lowprec.optim.spare`).

    **Non-finite gradients** skip that parameter's update (weights, medians, momentum and step
    count untouched) and count in ``optimizer.skipped_steps``.

    Args:
        params: parameters or parameter groups (every argument below may be set per group).
        lr: multiplicative step in nats per step (>= 0).
        momentum: EMA coefficient of the gradient momentum, in [0, 1).
        sigma: log-std of the sampling noise ``eps = exp(sigma * xi)``, in [0, 1].
        weight_decay: strength ``lambda`` of the decay of ``log m`` toward ``log m_ref``
            (>= 0; 0 disables decay and the bounds); also the AdamW rule's decoupled decay.
        m_ref: reference median in units of each tensor's ``m0`` (> 0).
        init: ``"from_weights"``, ``"moment_matched"`` or ``"abs_pair"`` (see above).
        init_sigma: spread ``s0`` of the initial medians, in (0, 3].
        sign_beta: ``None`` takes the sign of the updated momentum; a value ``b`` in [0, 1)
            takes Lion's ``sign(b * u + (1 - b) * g)`` before updating ``u``.
        separate_momentum: keep ``u+ = EMA(g theta+)`` and ``u- = EMA(-g theta-)`` instead of
            one shared momentum of ``g`` (+4 bytes per parameter).
        point_estimate: ``"median"`` (``m+ - m-``) or ``"mean"`` (times ``exp(sigma**2/2)``).
        noise: ``"irwin_hall"`` (default, fast, bounded at 3.45) or ``"box_muller"`` (exact
            normals); see :mod:`~lightning_lowprec.optim.counter_rng`.
        adamw: ``"auto"``, ``"always"`` or ``"never"`` (see above).
        adamw_lr_ratio: the AdamW rule's learning rate as a multiple of ``lr`` (>= 0).
        adamw_betas: the AdamW rule's ``(beta1, beta2)``, each in [0, 1). Not ``betas``: torch's
            ``OneCycleLR`` / ``CyclicLR`` (``cycle_momentum``) cycle ``betas[0]`` where an
            optimizer has ``betas``, and LMD's ``momentum`` is what they should cycle.
        eps: the AdamW rule's epsilon (>= 0).
        seed: base of every random stream; ``None`` draws one from torch's global generator
            (so ``seed_everything`` makes it reproducible), broadcast from rank 0 under
            ``torch.distributed`` (:func:`~lightning_lowprec.optim.base.shared_seed`).
        foreach: the eager kernels' batching: ``True`` ``torch._foreach_*`` ops, ``False`` one
            tensor at a time, ``None`` torch's rule (batched on CUDA only;
            :func:`~lightning_lowprec.optim.base.use_foreach`).
        compiled: ``"auto"`` (default) runs each tensor's update and sample as one
            ``torch.compile``'d kernel with in-graph noise wherever
            :func:`~lightning_lowprec.optim.base.compile_works` (CPU with a C++ compiler,
            CUDA with Triton), else the eager kernels after one warning; ``True`` always,
            ``False`` never (tests, debugging). The first step and the first sample compile
            (logged at INFO; seconds with a warm Inductor cache, tens of seconds cold); no
            recompilation follows for new learning rates or shapes. With ``weight_decay > 0``
            the exponentials are inline (:func:`_exp_in_range`).
        nonfinite: ``"skip"`` (default) skips the update of a parameter whose gradient is not
            finite, with a rate-limited warning naming it; ``"raise"`` raises
            ``FloatingPointError`` naming it, before any weight or state changes.
    """

    _validate_group = staticmethod(_validate)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        sigma: float = 0.05,
        weight_decay: float = 0.1,
        *,
        m_ref: float = 1.0,
        init: Init = "from_weights",
        init_sigma: float = 0.5,
        sign_beta: float | None = None,
        separate_momentum: bool = False,
        point_estimate: Literal["median", "mean"] = "median",
        noise: NoiseKind = "irwin_hall",
        adamw: AdamWMode = "auto",
        adamw_lr_ratio: float = 0.3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        seed: int | None = None,
        foreach: bool | None = None,
        compiled: CompiledMode = "auto",
        nonfinite: NonFiniteMode = "skip",
    ) -> None:
        seed = shared_seed(seed)
        defaults = dict(
            lr=lr, momentum=momentum, sigma=sigma, weight_decay=weight_decay, m_ref=m_ref,
            init=init, init_sigma=init_sigma, sign_beta=sign_beta,
            separate_momentum=separate_momentum, point_estimate=point_estimate, noise=noise,
            adamw=adamw, adamw_lr_ratio=adamw_lr_ratio, adamw_betas=adamw_betas, eps=eps,
            seed=seed, foreach=foreach, compiled=compiled, nonfinite=nonfinite,
        )
        super().__init__(params, defaults)
        self._sampled: list[Tensor] | None = None
        self._sampled_draw: int | None = None
        self._drawn = False
        self._written: dict[Tensor, int] = {}
        # Gradient accumulation (see optim/spare.py): each parameter's spare buffer, the
        # parameters given this step's training sample, and the version of the local tensor
        # at which it held the point estimate LMD computed (the value a spare may stash).
        self._spares: dict[Tensor, Spare] = {}
        self._drawn_params: set[Tensor] = set()
        self._exact: dict[Tensor, int] = {}
        track(self)  # Fabric's plugin finds this optimizer by its parameters

    # -- the posterior protocol (lightning_lowprec.posterior.PosteriorOptimizer) ----------

    @property
    def holds_sample(self) -> bool:
        """Whether the parameters hold a sample (``True`` between :meth:`sample_` and the
        next :meth:`restore_` or :meth:`step`)."""
        return self._sampled is not None

    @torch.no_grad()
    def sample_(self, draw: int | None = None) -> None:
        """Write this step's sample ``theta`` into every LMD parameter that requires grad.

        Idempotent within a step: the noise depends only on (seed, parameter, step count),
        so calling it again, also after :meth:`restore_`, writes the same values. Under
        gradient accumulation it is drawn once per step: from a parameter's first redraw
        within a step on, it keeps a spare buffer (one element per element, of its dtype)
        and the sample and the point estimate trade places instead of being recomputed
        (:mod:`~lightning_lowprec.optim.spare`).

        Args:
            draw: ``None``, the training sample of this step. An integer ``k >= 0``: the
                ``k``-th predictive draw from the current posterior (for Bayesian model
                averaging, :func:`~lightning_lowprec.predictive.posterior_predict`): the same
                formula and noise kind, keyed by (seed, parameter, step, ``k``) apart from the
                training noise, so draws are independent of each other and of training and
                reproducible. A predictive draw leaves the next :meth:`step` as it was.
        """
        if draw is not None and (not isinstance(draw, int) or draw < 0):
            raise ValueError(f"draw must be None or an integer >= 0, got {draw!r}.")
        if self._sampled is not None and self._sampled_draw == draw:
            return
        began, fast = time.perf_counter(), False
        sampled = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self._state(p, group)
                if state["adamw"]:
                    continue
                sampled.append(p)
                shard = sharded.local(p)
                if shard.numel() == 0:
                    continue
                if self._sampled is None:
                    self._adopt_write(p, group, state)
                if draw is not None:
                    self._forget_spare(p)
                elif self._sample_from_spare(p, shard):
                    continue
                words = self._key_words(group, state["index"], state["step"], draw)
                lp = sharded.local(state["log_median_pos"])
                ln = sharded.local(state["log_median_neg"])
                noise = group["noise"]
                start = sharded.flat_offset(p)
                if use_compiled(group, shard.device):
                    fast = True
                    sigma = torch.tensor(group["sigma"], dtype=torch.float32, device=shard.device)
                    # One graph for plain tensors and shards (see sharded.offset_tensor): the
                    # offset is always a tensor, int32 with the high part folded into the keys
                    # unless the range crosses a multiple of 2**30.
                    folded = fold_high(words, start, shard.numel())
                    if folded is None:
                        offset = torch.tensor(start, dtype=torch.int64, device=shard.device)
                    else:
                        words, low = folded
                        offset = torch.tensor(low, dtype=torch.int32, device=shard.device)
                    keys = torch.tensor(words, dtype=torch.int32, device=shard.device)
                    compiled(_sample_tensor)(shard, lp, ln, keys, sigma, noise, offset,
                                             inline=_exp_in_range(group, state["log_m_ref"]))
                else:
                    keys = torch.tensor(words, dtype=torch.int32, device=shard.device)
                    _sample_chunked(shard, lp, ln, keys, group["sigma"], noise, start)
                if draw is None:
                    self._drawn_params.add(p)
                    if p in self._spares:
                        self._spares[p].version = shard._version
        self._sampled, self._sampled_draw = sampled, draw
        if fast:
            self._report_compile("sample", began)
        if draw is None:
            self._drawn = True

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the point estimate back into the parameters that hold a sample (else no-op):
        from the spare buffer where it holds it (see :meth:`sample_`), else computed from
        the log-medians, first stashing a training sample in the spare if one exists."""
        if self._sampled is None:
            return
        groups = {p: g for g in self.param_groups for p in g["params"]}
        training = self._sampled_draw is None
        for p in self._sampled:
            group, state = groups[p], self.state[p]
            scale, mean = _scale(group)
            lp, ln = sharded.local(state["log_median_pos"]), sharded.local(state["log_median_neg"])
            shard = sharded.local(p)
            if shard.numel() == 0:
                continue
            spare = self._spares.get(p) if training else None
            if spare is not None and spare.holds == "point":
                if spare.version == shard._version:
                    spare.swap_(shard)
                    self._written[p], self._exact[p] = p._version, shard._version
                    continue
                spare.holds = None  # the sample was written over: compute, keep nothing
            elif spare is not None and spare.version == shard._version:
                spare.stash_(shard, "sample")
            if use_compiled(group, shard.device):
                scale = torch.tensor(scale, dtype=torch.float32, device=shard.device)
                compiled(_point_estimate_tensor)(
                    shard, lp, ln, scale, mean, inline=_exp_in_range(group, state["log_m_ref"]),
                    guard=True)
            else:
                _point_estimate_tensor(shard, lp, ln, scale, mean)
            self._written[p], self._exact[p] = p._version, shard._version
        self._sampled = None

    def _sample_from_spare(self, p: Tensor, shard: Tensor) -> bool:
        """Put this step's training sample into ``p`` (its local tensor ``shard``) from the
        spare, if that holds it; else prepare the spare for the draw that follows: allocate
        it at the first redraw within a step and stash the point estimate ``p`` holds, when
        that is exactly LMD's. Returns whether the sample is in place."""
        spare = self._spares.get(p)
        exact = self._exact.get(p) == shard._version  # a shard's writes are not adopted
        if spare is not None and spare.holds == "sample" and exact:
            spare.swap_(shard)
            return True
        if spare is None and p in self._drawn_params:
            spare = self._spares[p] = Spare(shard)
        if spare is not None:
            if exact:
                spare.stash_(shard, "point")
            else:
                spare.holds = None
        return False

    def _forget_spare(self, p: Tensor) -> None:
        """What ``p``'s spare holds is no longer this step's (its buffer is kept)."""
        spare = self._spares.get(p)
        if spare is not None:
            spare.holds = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; the parameters as they are now are taken to match the loaded
        log-medians (a resume loads the model first), so their earlier writes are not
        adopted."""
        super().load_state_dict(state_dict)
        self._written = {p: p._version for p in self.state}
        self._end_of_step()
        self._exact.clear()

    def _end_of_step(self) -> None:
        """The next sample is a new one: nothing a spare holds is valid any more."""
        for spare in self._spares.values():
            spare.holds = None
        self._drawn_params.clear()

    def sampled_params(self) -> AbstractContextManager[None]:
        """``with optimizer.sampled_params(): loss = f(model(x)); loss.backward()``: the
        forward and backward see this step's sample; the point estimate is back on exit."""
        return sampled_params(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update from the gradients (taken at this step's sample if one was drawn).

        With a ``closure``, the closure runs at this step's sample. Afterwards the parameters
        hold the new point estimate.
        """
        loss = None
        if closure is not None:
            self.sample_()
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore_()
                raise
        try:
            self._run_step()
        finally:  # also after nonfinite="raise": the parameters get their point estimate back
            self.restore_()
            self._drawn = False
            self._end_of_step()
        return loss

    def log_medians(self) -> Iterator[tuple[Tensor, LogMedians]]:
        """Each parameter LMD moves multiplicatively, with its log-medians and bounds (read-only).

        For monitoring (:class:`~lightning_lowprec.callbacks.NormMonitor`): the tensors are the
        live state, not copies. A parameter appears from its first step on; parameters on the
        AdamW rule have no medians and are left out. The bounds follow the group's current
        ``weight_decay``, as the next step's clamp does.
        """
        for group in self.param_groups:
            half = 1.0 / group["weight_decay"] if group["weight_decay"] > 0 else math.inf
            for p in group["params"]:
                state = self.state.get(p)
                if not state or state["adamw"]:
                    continue
                lmr = state["log_m_ref"]
                yield p, LogMedians(
                    state["log_median_pos"], state["log_median_neg"], lmr, lmr - half, lmr + half
                )

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _keys(
        group: dict[str, Any], index: int, step: int, device: torch.device,
        draw: int | None = None,
    ) -> Tensor:
        """Keys of the sample that update ``step + 1`` of parameter ``index`` follows (or of
        predictive draw ``draw`` at that step)."""
        words = LMD._key_words(group, index, step, draw)
        return torch.tensor(words, dtype=torch.int32, device=device)

    @staticmethod
    def _key_words(
        group: dict[str, Any], index: int, step: int, draw: int | None = None
    ) -> list[int]:
        """:meth:`_keys` as Python ints."""
        if draw is None:
            return derive_keys(group["seed"], index, step, _PURPOSE_SAMPLE)
        return derive_keys(group["seed"], index, step, _PURPOSE_PREDICT, draw)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if state["adamw"]:
            self._init_adamw_state(p, state)
            return
        w = sharded.local(p).detach().float()
        s = math.sqrt(sharded.mean_square(p))
        if not 0.0 < s < math.inf:
            fan_in = math.prod(p.shape[1:]) if p.ndim >= 2 else p.numel()
            s = 1.0 / math.sqrt(fan_in)
        e = math.exp(group["init_sigma"] ** 2)
        m0 = s / math.sqrt(2.0 * e * (e - 1.0))
        lmr = math.log(group["m_ref"] * m0)
        half = 1.0 / group["weight_decay"] if group["weight_decay"] > 0 else math.inf
        scale, mean = _scale(group)
        if group["init"] == "from_weights":
            lp, ln = _log_medians_from_weights(w / scale if mean else w, m0)
        else:
            keys = derive_keys(group["seed"], state["index"], 0, _PURPOSE_INIT)
            zp, zn = normal_pair(w.numel(), torch.tensor(keys, dtype=torch.int32, device=w.device),
                                 "box_muller", sharded.offset_tensor(p))
            zp, zn = zp.view_as(w), zn.view_as(w)
            if group["init"] == "moment_matched":
                lp = math.log(m0) + group["init_sigma"] * zp
                ln = math.log(m0) + group["init_sigma"] * zn
            else:
                lp = (s * zp).abs_().add_(_ABS_PAIR_FLOOR).log_()
                ln = (s * zn).abs_().add_(_ABS_PAIR_FLOOR).log_()
        state["log_m_ref"] = lmr
        state["log_median_pos"] = lp.clamp_(lmr - half, lmr + half).contiguous()
        state["log_median_neg"] = ln.clamp_(lmr - half, lmr + half).contiguous()
        state["momentum"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        if group["separate_momentum"]:
            state["momentum_neg"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        if group["init"] != "from_weights":
            _point_estimate_tensor(sharded.local(p), state["log_median_pos"],
                                   state["log_median_neg"], scale, mean)
        self._written[p] = p._version

    def _adopt_write(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """If ``p`` was written since LMD last wrote its point estimate (``load_state_dict``
        of the model, an EMA swap, a revert to the best weights), re-derive its log-medians
        from ``p`` as ``init="from_weights"`` does, keeping ``log m_ref``, the bounds and the
        momentum: the next step then starts from the written weights instead of undoing the
        write. Call only while ``p`` holds no sample (a sample is LMD's own write). Sharded
        (``DTensor``) parameters are not checked: writes to their local shards do not show in
        the ``DTensor``'s version counter."""
        if sharded.is_sharded(p) or self._written.get(p, p._version) == p._version:
            return
        half = 1.0 / group["weight_decay"] if group["weight_decay"] > 0 else math.inf
        lmr = state["log_m_ref"]
        scale, mean = _scale(group)
        w = p.detach().float()
        lp, ln = _log_medians_from_weights(w / scale if mean else w, math.exp(lmr) / group["m_ref"])
        state["log_median_pos"].copy_(lp.clamp_(lmr - half, lmr + half))
        state["log_median_neg"].copy_(ln.clamp_(lmr - half, lmr + half))
        self._written[p] = p._version
        self._forget_spare(p)

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Dispatch, as torch's AdamW does: the compiled kernel (:func:`_compiled_kernel`) on
        each tensor of a ``compiled`` group, else :func:`_multi_tensor` (``foreach``) or
        :func:`_single_tensor`; all three take the same :class:`Hyper` records."""
        states = [self.state[p] for p in params]
        sampled = set(self._sampled or ())
        for p, s in zip(params, states, strict=True):
            if p not in sampled:
                self._adopt_write(p, group, s)
        hs = [_hyper(group, s) for s in states]
        separate = group["separate_momentum"]
        drawn = self._drawn and separate
        # The sample this update follows was drawn before ``step`` was incremented.
        args = [
            (p, p.grad, s["log_median_pos"], s["log_median_neg"], s["momentum"],
             s["momentum_neg"] if separate else None,
             self._keys(group, s["index"], s["step"] - 1, p.device) if drawn else None)
            for p, s in zip(params, states, strict=True)
        ]
        flags = dict(separate=separate, interp=group["sign_beta"] is not None, drawn=drawn,
                     noise=group["noise"], mean=_scale(group)[1])
        device = params[0].device
        if use_compiled(group, device):
            fn = compiled(_compiled_kernel)
            table = torch.tensor(hs, dtype=torch.float32, device=device)
            for i, (p, s) in enumerate(zip(params, states, strict=True)):
                fn(*args[i], table[i].to(p.device), inline=_exp_in_range(group, s["log_m_ref"]),
                   low_weight=group["momentum"] > 0.5, offset=sharded.state_offset(s, p),
                   **flags)
        elif use_foreach(group, device):
            for idx in by_device(params):
                cols = [list(c) for c in zip(*(args[i] for i in idx), strict=True)]
                _multi_tensor(*cols[:5], cols[5] if separate else None, cols[6],
                              [hs[i] for i in idx], [states[i].get("offset") for i in idx],
                              **flags)
        else:
            work = _Scratch(max(_slice_numel(a[:6]) for a in args), device)
            for a, h, s in zip(args, hs, states, strict=True):
                _single_tensor(*a, h, offset=s.get("offset"), work=work, **flags)
        for shard, p in zip(params, map(self._owner, params), strict=True):
            self._written[p], self._exact[p] = p._version, shard._version
        if self._sampled is not None:
            updated = {self._owner(p) for p in params}
            self._sampled = [p for p in self._sampled if p not in updated]

def _log_medians_from_weights(target: Tensor, m0: float) -> tuple[Tensor, Tensor]:
    """``log m±`` with ``m± = (sqrt(w^2 + 4 m0^2) ± w) / 2``: ``m+ - m- = target``,
    ``m+ m- = m0^2`` (``init="from_weights"``, see :class:`LMD`)."""
    big = (torch.sqrt(target.square() + 4.0 * m0 * m0) + target.abs()) / 2.0
    small = m0 * m0 / big
    positive = target >= 0
    return torch.where(positive, big, small).log_(), torch.where(positive, small, big).log_()


def _scale(group: dict[str, Any]) -> tuple[float, bool]:
    """The point-estimate scale and whether it applies (``point_estimate="mean"``)."""
    if group["point_estimate"] == "mean":
        return math.exp(group["sigma"] ** 2 / 2.0), True
    return 1.0, False
