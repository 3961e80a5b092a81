"""M+Adam: additive + multiplicative updates with weights stored in a low-precision format.

Liang, Loeschcke, Toftrup, Anandkumar (arXiv 2607.10611), as summarised in RESEARCH.md §3:

    w <- w + w * u_m + u_a                       (then rounded into the storage format)
    u_a = -lr * m_hat / (sqrt(v_hat) + eps)      Adam on g: moves zeros, flips signs
    g_e = ln 2 * w * g                           gradient w.r.t. the base-2 exponent of w
    u_m = 2**(-lr_m * g_e / (sqrt(v_hat_e) + eps)) - 1   Madam-style relative step
    decoupled weight decay: w * (1 - lr * weight_decay)

An additive step smaller than half a unit in the last place of ``w`` rounds away (BF16:
``|w| * 2**-9``), so large weights stop moving in a coarse format; the multiplicative step is
relative, so it survives rounding once ``lr_m`` exceeds the format's relative half-ulp (BF16
~0.2-0.4 %, E4M3 3-6 %). There is no FP32 master copy: the rounded weight *is* the weight.

The storage formats are emulated: the rounded weight is written into the parameter in its own
dtype (``storage`` never changes it), so the bytes saved are those of the parameter's dtype.
With bf16 parameters weights + state are 10 B/param (AdamW with an fp32 master: 16); with fp32
parameters 16 B/param whatever the storage (fp32 AdamW: 12), FP8 and FP4 values included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_lowprec.optim import sharded
from lightning_lowprec.optim.base import (
    COMPILED_MIN_NUMEL,
    EXP_SMALL_BOUND,
    STEP_SLICE,
    AdamWMode,
    CompiledMode,
    LowPrecisionOptimizer,
    NonFiniteMode,
    by_device,
    compiled,
    ema_,
    expm1_small,
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
from lightning_lowprec.optim.counter_rng import derive_keys
from lightning_lowprec.optim.rounding import (
    GRIDS,
    fp8_scale_exponent,
    nearest_bf16,
    round_to_grid,
    stochastic_bf16,
)

__all__ = ["STORAGE_FORMATS", "MPlusAdam"]

Storage = Literal["bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]
STORAGE_FORMATS: dict[str | None, str | None] = {
    None: None,
    "bf16": None,
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    # There is no per-tensor FP4 format: one fp32 scale for a whole tensor leaves E2M1's 15
    # values for all its weights, so almost everything would round to 0 or +-max. The OCP
    # MX grid (one power-of-two scale per 32 consecutive elements) is the FP4 storage
    # format hardware uses, and the only FP4 format here.
    "fp4_e2m1": "mxfp4_e2m1",
}
"""Storage name -> the :func:`~lightning_lowprec.quantize` format that rounds into it."""
DEFAULT_ROUNDING: dict[str | None, str] = {
    None: "even", "bf16": "even", "fp8_e4m3": "stochastic", "fp8_e5m2": "stochastic",
    "fp4_e2m1": "stochastic",
}
"""Round-to-nearest works for BF16; on FP8 grids (measured with a per-tensor scale then
recomputed every step) it diverged (M+Adam) or lost badly (AdamW), and stochastic rounding
matched BF16. Stochastic draws come from counter-based noise of (seed, parameter, step)."""
_LN2 = math.log(2.0)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_mult")
_PURPOSE_ROUND = 3
_FP8 = ("fp8_e4m3", "fp8_e5m2")
_SLICE = STEP_SLICE // 4
"""Elements per slice of the eager kernels (256 KiB per fp32 temporary): M+Adam's update and
its FP4 rounding hold a dozen temporaries at once, which at ``STEP_SLICE`` are 12 MiB."""


def _ema_sq_(v: Tensor, x: Tensor, weight: Any) -> Tensor:
    """``v <- (1 - weight) * v + weight * x`` for a second moment (``x = g**2 >= 0``): an inf
    in ``v`` stays inf (the update then is 0) where :func:`ema_`'s ``inf + w * (x - inf)``
    would be NaN and spread into the weight."""
    return v.mul_(1.0 - weight).add_(x.mul_(weight))


class Hyper(NamedTuple):
    """One tensor's step of M+Adam, in the form the kernels use (reciprocals, so each branch
    costs one division). Built once per tensor and step in :meth:`MPlusAdam._update`; the
    compiled kernel gets the same fields as one fp32 tensor (no recompilation when ``lr``
    changes) and unpacks it by name."""

    w1: Any
    """``1 - beta1``: the first moment's EMA weight."""
    w2: Any
    """``1 - beta2``: both second moments' EMA weight."""
    eps: Any
    decay: Any
    """``1 - lr * weight_decay``."""
    step_a: Any
    """``-lr / (1 - beta1**t)``: the additive step with the first moment's bias correction."""
    inv_bc2_sqrt: Any
    """``1 / sqrt(1 - beta2**t)``."""
    step_m: Any
    """``-lr_m * ln 2``: the multiplicative step, in natural-log units."""


def _update_math(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, ve: Tensor | None, h: Hyper,
    small: bool = False, low_weight: bool = False,
) -> Tensor:
    """One M+Adam update of one tensor (or slice): the new weight in fp32, before rounding;
    the moments ``m``, ``v`` and ``ve`` (``None`` without the multiplicative branch) are
    updated in place. ``small`` (the compiled kernel, when :func:`_exponent_is_small`)
    computes ``expm1`` with :func:`expm1_small`; ``low_weight`` (both EMA weights below 0.5)
    spells the EMAs as in :func:`ema_`."""
    w = w.float()
    g = g.float()
    m32, v32 = m.float(), v.float()
    ema_(m32, g, h.w1, low_weight)
    _ema_sq_(v32, g * g, h.w2)
    ua = (m32 * h.step_a).div_(v32.sqrt().mul_(h.inv_bc2_sqrt).add_(h.eps))
    if ve is not None:
        ve32 = ve.float()
        ge = (w * g).mul_(_LN2)
        _ema_sq_(ve32, ge * ge, h.w2)
        de = ge.div_(ve32.sqrt().mul_(h.inv_bc2_sqrt).add_(h.eps)).mul_(h.step_m)
        factor = expm1_small(de) if small else torch.expm1(de)
        w_new = (w * factor.add_(h.decay)).add_(ua)
        if ve32 is not ve:
            ve.copy_(ve32)
    else:
        w_new = (w * h.decay).add_(ua)
    for state, value in ((m, m32), (v, v32)):
        if value is not state:
            state.copy_(value)
    return w_new


def _compiled_kernel(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, ve: Tensor | None, keys: Tensor | None,
    hp: Tensor, *, bf16: str | None, small: bool, low_weight: bool, offset: Tensor | None,
) -> None:
    """:func:`_update_math` and the BF16 rounding (``bf16``: ``None``, ``"even"`` or
    ``"stochastic"`` with ``keys``) as one ``torch.compile``'d kernel that writes into ``p``;
    ``hp`` holds the :class:`Hyper` fields in order."""
    w_new = _update_math(p, g, m, v, ve, Hyper(*hp.unbind()), small, low_weight)
    if bf16 == "even" and p.dtype == torch.bfloat16:  # the store's cast rounds the same
        bf16 = None
    p.copy_(_round_bf16(w_new, bf16, keys, offset))


def _fp8_update_kernel(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, ve: Tensor | None, hp: Tensor, *,
    small: bool, low_weight: bool,
) -> Tensor:
    """:func:`_compiled_kernel` for FP8 storage: writes the unrounded new weights into ``p``
    and returns their largest magnitude (fp32, 0-d), reduced in the same loop, for
    :func:`_fp8_round_kernel`. (Its own function, so its variants do not count against the
    other's recompile limit.)"""
    w_new = _update_math(p, g, m, v, ve, Hyper(*hp.unbind()), small, low_weight)
    p.copy_(w_new)
    return w_new.abs().amax()


def _fp8_round_kernel(
    p: Tensor, keys: Tensor | None, amax: Tensor, current: Tensor, *, storage: str,
) -> Tensor:
    """:func:`_round_stored` of a flat fp32 ``p`` onto an FP8 grid as one compiled pass: the
    scale exponent from the new weights' ``amax`` and the ``current`` one (both 1-element),
    which it returns, then the rounding; the integer and exact fp32 arithmetic of the eager
    rounding, so the same bits. (A pass of its own: the scale needs the whole tensor's
    ``amax`` before any element is rounded.)"""
    exponent = fp8_scale_exponent(amax, GRIDS[storage], current)
    p.copy_(round_to_grid(p, storage, exponent=exponent, keys=keys))
    return exponent


def _round_bf16(w: Tensor, bf16: str | None, keys: Tensor | None, offset: Any) -> Tensor:
    """``w`` (fp32) on the BF16 grid under ``bf16`` (``None``: unchanged)."""
    if bf16 == "even":
        return nearest_bf16(w)
    if bf16 == "stochastic":
        return stochastic_bf16(w, keys, offset)
    return w


def _exponent_is_small(step_m: float, beta2: float, eps: float) -> bool:
    """Whether every exponent ``de`` of the multiplicative branch is within EXP_SMALL_BOUND.

    ``de = step_m * g_e / (sqrt(v_e) / sqrt(1 - beta2**t) + eps)`` and the updated
    ``v_e >= (1 - beta2) * g_e**2``, so ``|de| <= |step_m| / sqrt(1 - beta2)``; the factor 1.5
    covers rounding (also of subnormal ``v_e``). Where ``(1 - beta2) * g_e**2`` underflows to
    0, ``|g_e| < 2**-75 / sqrt(1 - beta2)`` and ``eps >= 1e-20`` keeps ``|de|`` within the same
    bound. The defaults give ``|de| <= 0.04``.
    """
    return abs(step_m) * 1.5 <= EXP_SMALL_BOUND * math.sqrt(1.0 - beta2) and eps >= 1e-20


def _foreach_math(
    ws: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
    ves: list[Tensor] | None, hs: list[Hyper],
) -> list[Tensor]:
    """:func:`_update_math` over lists with ``torch._foreach_*`` ops (the same arithmetic,
    bit for bit); the :class:`Hyper` records differ only in their step-dependent fields."""
    h = hs[0]
    step_as, inv_bc2s = [x.step_a for x in hs], [x.inv_bc2_sqrt for x in hs]
    ws = [w.float() for w in ws]
    gs = [g.float() for g in gs]
    m32s, v32s = [m.float() for m in ms], [v.float() for v in vs]
    torch._foreach_lerp_(m32s, gs, h.w1)
    torch._foreach_mul_(v32s, 1.0 - h.w2)
    g2s = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(g2s, h.w2)
    torch._foreach_add_(v32s, g2s)
    uas = torch._foreach_mul(m32s, step_as)
    denom = torch._foreach_sqrt(v32s)
    torch._foreach_mul_(denom, inv_bc2s)
    torch._foreach_add_(denom, h.eps)
    torch._foreach_div_(uas, denom)
    if ves is not None:
        ve32s = [ve.float() for ve in ves]
        ges = torch._foreach_mul(ws, gs)
        torch._foreach_mul_(ges, _LN2)
        torch._foreach_mul_(ve32s, 1.0 - h.w2)
        ge2s = torch._foreach_mul(ges, ges)
        torch._foreach_mul_(ge2s, h.w2)
        torch._foreach_add_(ve32s, ge2s)
        denom = torch._foreach_sqrt(ve32s)
        torch._foreach_mul_(denom, inv_bc2s)
        torch._foreach_add_(denom, h.eps)
        torch._foreach_div_(ges, denom)
        torch._foreach_mul_(ges, h.step_m)
        factors = torch._foreach_expm1(ges)
        torch._foreach_add_(factors, h.decay)
        w_news = torch._foreach_mul(ws, factors)
        pairs = list(zip(ves, ve32s, strict=True))
    else:
        w_news = torch._foreach_mul(ws, h.decay)
        pairs = []
    torch._foreach_add_(w_news, uas)
    pairs += list(zip(ms, m32s, strict=True)) + list(zip(vs, v32s, strict=True))
    for state, value in pairs:
        if value is not state:
            state.copy_(value)
    return w_news


class _Target(NamedTuple):
    """Where one tensor's new weight goes: its BF16 rounding (``bf16``), or the FP8/FP4
    ``storage`` grid (``None``: none) rounded ``stochastic`` with ``keys`` (int32) from the
    noise of element ``offset`` on (a shard's start), in slices of ``size`` elements that cut
    no MX block; ``direct``: rounded onto the grid slice by slice as it is computed, else
    (FP8, whose scale needs the whole tensor, and the compiled kernel's results) written
    unrounded into the fp32 parameter and rounded there by :func:`_round_stored` (after the
    compiled kernel, FP8 by the compiled :func:`_fp8_round_kernel`)."""

    bf16: str | None
    storage: str | None
    keys: Tensor | None
    offset: Tensor | None
    size: int
    direct: bool


def _write(p: Tensor, w: Tensor, start: int, t: _Target) -> None:
    """Write the fp32 new weights ``w`` of the slice ``p`` (``start`` elements into its
    tensor) under ``t``."""
    offset = shifted(t.offset, start)
    if t.direct:
        w = round_to_grid(w.reshape(-1), t.storage, row=_row(p), keys=t.keys, offset=offset)
    p.copy_(_round_bf16(w, t.bf16, t.keys, offset).view(p.shape))


def _row(p: Tensor) -> int:
    """The length of the last dimension, along which MX blocks run."""
    return p.shape[-1] if p.ndim else 1


def _single_tensor(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, ve: Tensor | None, h: Hyper, t: _Target,
) -> None:
    """One tensor, slice by slice (a few MiB of temporaries whatever its size)."""
    for start, (ps, gs, ms, vs, ves) in flat_slices((p, g, m, v, ve), t.size):
        _write(ps, _update_math(ps, gs, ms, vs, ves, h), start, t)


def _multi_tensor(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
    ves: list[Tensor] | None, hs: list[Hyper], ts: list[_Target],
) -> None:
    """Tensors of one device with ``torch._foreach_*`` ops, in :func:`slice_batches`."""
    rows = list(zip(ps, gs, ms, vs, ves or [None] * len(ps), strict=True))
    for batch in slice_batches(rows, _SLICE):
        cols = list(zip(*(views for _, _, views in batch), strict=True))
        w_news = _foreach_math(*(list(c) for c in cols[:4]), list(cols[4]) if ves else None,
                               [hs[i] for i, _, _ in batch])
        for (i, start, views), w in zip(batch, w_news, strict=True):
            _write(views[0], w, start, ts[i])


def _round_stored(p: Tensor, state: dict[str, Any], t: _Target) -> None:
    """Round the fp32 weights in ``p`` onto the ``t.storage`` grid in place, slice by slice;
    for FP8 first move the scale exponent ``state["scale_exp"]`` if ``p`` left its band
    (:func:`~lightning_lowprec.optim.rounding.fp8_scale_exponent`)."""
    exponent = None
    if t.storage != "fp4_e2m1":
        amax = torch.maximum(p.amax(), -p.amin()).float()
        exponent = fp8_scale_exponent(amax, GRIDS[t.storage], state["scale_exp"])
        state["scale_exp"] = exponent
    for start, (ps,) in flat_slices((p,), t.size):
        ps.copy_(round_to_grid(ps.reshape(-1), t.storage, exponent=exponent, row=_row(p),
                               keys=t.keys, offset=shifted(t.offset, start)).view(ps.shape))


def _validate(g: dict[str, Any]) -> None:
    """Check the M+Adam hyperparameters of a group (see :class:`MPlusAdam` for the ranges) but
    ``adamw``, ``seed``, ``foreach`` and ``compiled``, which the base class checks."""
    inf = math.inf
    require_range("lr", g["lr"], 0.0, inf)  # 0 as torch: schedules reach it
    require_betas("betas", g["betas"])
    require_range("eps", g["eps"], 0.0, inf)
    require_range("weight_decay", g["weight_decay"], 0.0, inf)
    require_range("lr * weight_decay", g["lr"] * g["weight_decay"], 0.0, 1.0)
    require_range("lr_m_ratio", g["lr_m_ratio"], 0.0, inf)
    require(g["storage"] in STORAGE_FORMATS, "storage", g["storage"],
            f"one of {tuple(STORAGE_FORMATS)}")
    require(g["rounding"] in (None, "even", "stochastic"), "rounding", g["rounding"],
            "None, 'even' or 'stochastic'")
    if g["storage"] in _FP8:
        params = g.get("params", ())
        for p in [params] if isinstance(params, Tensor) else params:
            p = p[1] if isinstance(p, tuple) else p  # (name, parameter)
            require(p.dtype not in (torch.bfloat16, torch.float16), "storage", g["storage"],
                    f"float32 parameters for FP8 storage (a per-tensor-scaled FP8 value is not "
                    f"exact in {p.dtype}), or storage None, 'bf16' or 'fp4_e2m1' for them")
    valid_dtypes = (None, "float32", "bfloat16", torch.float32, torch.bfloat16)
    require(g["state_dtype"] in valid_dtypes, "state_dtype", g["state_dtype"],
            "None, float32 or bfloat16 (a torch.dtype or its name)")


class MPlusAdam(LowPrecisionOptimizer):
    """M+Adam: ``w <- w + w * u_m + u_a`` rounded into a storage format (see module doc).

    **Storage** (``storage``): after each update the weight is rounded into
    ``None`` (the parameter's own dtype: nothing for fp32, BF16 for a bf16 parameter),
    ``"bf16"``, ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (one power-of-two scale per tensor,
    ``2**state["scale_exp"]``, moved only when the largest weight leaves the grid's top two
    binades, so re-encoding is exact and zero-gradient weights keep their bits:
    :func:`~lightning_lowprec.optim.rounding.fp8_scale_exponent`) or ``"fp4_e2m1"`` (the MXFP4
    grid: a power-of-two scale per 32 elements along the last dim; there is no per-tensor
    FP4). The rounded value is written into the parameter, whose
    dtype holds it exactly for BF16 storage; for FP8/FP4 keep the parameter fp32 (emulation:
    a bf16 tensor cannot hold a per-tensor-scaled FP8 value exactly, so bf16 or fp16
    parameters with FP8 storage are refused). No FP32 copy is kept.

    **Rounding** (``rounding``): ``"even"`` (round to nearest, ties to even) or ``"stochastic"``
    (unbiased). ``None`` picks per storage: ``"even"`` for ``None``/``"bf16"`` (measured fine),
    ``"stochastic"`` for FP8 and FP4 (round-to-nearest diverged there). Stochastic draws are a
    pure function of (seed, parameter, step), so resuming and DDP ranks agree.

    **State**: ``exp_avg``, ``exp_avg_sq`` and the multiplicative branch's ``exp_avg_sq_mult``
    (AdamW's two plus one). ``state_dtype=None`` keeps the two second moments in fp32 whatever
    the parameter's dtype (a bf16 EMA with ``beta2 = 0.999`` cannot decay: ``0.999 * v``
    rounds back to ``v``) and ``exp_avg`` in bf16 for a bf16 parameter, fp32 otherwise: 10
    bytes per bf16 parameter. A dtype given puts all three in it (bf16: 6 bytes, measured fine
    with ``betas=(0.9, 0.95)``, whose ``0.95 * v`` still moves in bf16).

    **Defaults** are the measured working point of RESEARCH.md §3: ``lr=3e-3`` (AdamW's lr
    there), ``lr_m = 3 * lr``, ``betas=(0.9, 0.95)``, ``weight_decay=0.1``. ``lr_m_ratio``
    ties ``lr_m`` to ``lr`` so that a schedule on ``lr`` moves both branches. Under
    round-to-nearest a multiplicative step survives only if ``ln2 * lr_m`` exceeds the
    format's relative half-ulp, which for BF16 is up to ``2**-8``: with ``lr_m >= 5.6e-3``
    (the default 9e-3) every BF16 weight keeps moving; at ``lr_m = 3e-3`` a weight of 1000
    moves down to ~964 and stops. When a schedule takes ``lr_m`` lower, use
    ``rounding="stochastic"``, whose updates survive in expectation at any size.

    **Zeros and 1-D tensors** need no special rule: the additive branch moves them. ``adamw``
    (default ``"never"``) can still turn the multiplicative branch off for a group
    (``"always"``) or for 1-D and all-zero tensors (``"auto"``), e.g. from
    :func:`~lightning_lowprec.optim.param_groups`; storage rounding applies either way.

    **Non-finite gradients** skip that parameter's update (weight, state and step count
    untouched) and count in ``optimizer.skipped_steps``.

    Args:
        params: parameters or parameter groups (every argument below may be set per group).
        lr: learning rate of the additive branch, in weight units per step (>= 0).
        betas: ``(beta1, beta2)``; ``beta2`` also drives the multiplicative second moment.
        eps: added to both root second moments (>= 0).
        weight_decay: decoupled weight decay, ``w *= 1 - lr * weight_decay`` (>= 0).
        lr_m_ratio: learning rate of the multiplicative branch (in units of the exponent: a
            step of ``lr_m`` scales ``w`` by up to ``2**-lr_m``) as a multiple of ``lr`` (>= 0).
        storage: ``None``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"fp4_e2m1"``.
        rounding: ``None`` (per storage), ``"even"`` or ``"stochastic"``.
        state_dtype: ``None`` (see State), ``torch.float32``/``"float32"`` or
            ``torch.bfloat16``/``"bfloat16"``.
        adamw: ``"never"``, ``"auto"`` or ``"always"`` (see above).
        seed: base of the stochastic-rounding streams; ``None`` draws one from torch's global
            generator, broadcast from rank 0 under ``torch.distributed``
            (:func:`~lightning_lowprec.optim.base.shared_seed`).
        foreach: the eager kernels' batching: ``True`` ``torch._foreach_*`` ops, ``False`` one
            tensor at a time, ``None`` torch's rule (batched on CUDA only;
            :func:`~lightning_lowprec.optim.base.use_foreach`).
        compiled: ``"auto"`` (default) runs each tensor's update (and BF16 rounding) as one
            ``torch.compile``'d kernel (FP8 rounding as a second one, since its scale needs
            the whole tensor; FP4 rounding eagerly, in slices) wherever
            :func:`~lightning_lowprec.optim.base.compile_works`, else the eager kernels after
            one warning; ``True`` always, ``False`` never. Tensors under
            ``COMPILED_MIN_NUMEL`` (65536) elements take the ``foreach`` ops (counted on the
            whole tensor, so an FSDP2 shard takes its tensor's route on any number of ranks).
        nonfinite: ``"skip"`` (default) skips the update of a parameter whose gradient is not
            finite, with a rate-limited warning naming it; ``"raise"`` raises
            ``FloatingPointError`` naming it, before any weight or state changes.
    """

    _validate_group = staticmethod(_validate)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        lr_m_ratio: float = 3.0,
        storage: Storage | None = None,
        rounding: Literal["even", "stochastic"] | None = None,
        state_dtype: torch.dtype | str | None = None,
        adamw: AdamWMode = "never",
        seed: int | None = None,
        foreach: bool | None = None,
        compiled: CompiledMode = "auto",
        nonfinite: NonFiniteMode = "skip",
    ) -> None:
        seed = shared_seed(seed)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_m_ratio=lr_m_ratio,
            storage=storage, rounding=rounding, state_dtype=state_dtype, adamw=adamw,
            seed=seed, foreach=foreach, compiled=compiled, nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        for key in ("exp_avg", "exp_avg_sq") if state["adamw"] else _STATE_KEYS:
            state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group, key),
                                          memory_format=torch.contiguous_format)
        if group["storage"] in _FP8:
            amax = torch.maximum(p.amax(), -p.amin()).float()
            state["scale_exp"] = fp8_scale_exponent(amax, GRIDS[group["storage"]])
        rounding = group["rounding"] or DEFAULT_ROUNDING[group["storage"]]
        if sharded.is_sharded(p) and STORAGE_FORMATS[group["storage"]] is not None:
            raise NotImplementedError(
                f"MPlusAdam storage={group['storage']!r} rounds with a per-tensor scale and a "
                "torch.Generator, not shard by shard; under FSDP2 use storage=None or 'bf16'."
            )
        require(not (group["storage"] is None and rounding == "stochastic"
                     and p.dtype == torch.float16), "rounding", rounding,
                "'even' for float16 parameters without storage (stochastic BF16 only)")

    def _state_dtype(self, p: Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        """``state_dtype`` if given; else the first moment in the parameter's dtype when that
        is bf16 and fp32 otherwise, and the second moments always in fp32."""
        return _state_dtype(group["state_dtype"], p, second_moment=key != "exp_avg")

    def _adamw_rule(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # The AdamW rule of M+Adam is M+Adam without its multiplicative branch.
        self._update(group, params)

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Dispatch: the compiled kernel for large tensors of ``compiled`` groups, else
        :func:`_multi_tensor` (``foreach``) or :func:`_single_tensor`; then FP8/FP4 rounding
        of the weights the kernels left unrounded (:func:`_round_stored`)."""
        beta1, beta2 = group["betas"]
        lr, storage = group["lr"], group["storage"]
        rounding = group["rounding"] or DEFAULT_ROUNDING[storage]
        fast = use_compiled(group, params[0].device)
        batch = use_foreach(group, params[0].device)
        for mult in (True, False):
            subset = [p for p in params if ("exp_avg_sq_mult" in self.state[p]) == mult]
            if not subset:
                continue
            states = [self.state[p] for p in subset]
            hs = [
                Hyper(1.0 - beta1, 1.0 - beta2, group["eps"], 1.0 - lr * group["weight_decay"],
                      -lr / (1.0 - beta1 ** s["step"]), 1.0 / math.sqrt(1.0 - beta2 ** s["step"]),
                      -lr * group["lr_m_ratio"] * _LN2)
                for s in states
            ]
            ves = [s["exp_avg_sq_mult"] for s in states] if mult else [None] * len(states)
            route = [self._route(p, storage, fast, batch) for p in subset]
            ts = [self._target(p, s, group, rounding, kernel == "compiled")
                  for p, s, kernel in zip(subset, states, route, strict=True)]
            args = [(p, p.grad, s["exp_avg"], s["exp_avg_sq"], ve)
                    for p, s, ve in zip(subset, states, ves, strict=True)]
            compiled_ = [i for i, k in enumerate(route) if k == "compiled"]
            rounded = set()
            if compiled_:
                table = torch.tensor(hs, dtype=torch.float32, device=subset[0].device)
                flags = dict(small=_exponent_is_small(hs[0].step_m, beta2, group["eps"]),
                             low_weight=max(1.0 - beta1, 1.0 - beta2) < 0.5)
                for i in compiled_:
                    p, s, t = subset[i], states[i], ts[i]
                    hp = table[i].to(p.device)
                    if t.storage in _FP8:
                        amax = compiled(_fp8_update_kernel)(*args[i], hp, **flags)
                        exponent = compiled(_fp8_round_kernel)(p, t.keys, amax, s["scale_exp"],
                                                               storage=t.storage)
                        s["scale_exp"] = exponent.reshape(())
                        rounded.add(i)
                    else:
                        compiled(_compiled_kernel)(*args[i], t.keys, hp, bf16=t.bf16,
                                                   offset=sharded.state_offset(s, p), **flags)
            for i, kernel in enumerate(route):
                if kernel == "single":
                    _single_tensor(*args[i], hs[i], ts[i])
            batched = [i for i, k in enumerate(route) if k == "foreach"]
            for idx in by_device([subset[i] for i in batched]):
                idx = [batched[j] for j in idx]
                cols = [list(c) for c in zip(*(args[i] for i in idx), strict=True)]
                _multi_tensor(*cols[:4], cols[4] if mult else None, [hs[i] for i in idx],
                              [ts[i] for i in idx])
            for i, (p, s, t) in enumerate(zip(subset, states, ts, strict=True)):
                if t.storage is not None and not t.direct and i not in rounded:
                    _round_stored(p, s, t)

    def _route(self, p: Tensor, storage: str | None, fast: bool, batch: bool) -> str:
        """``"compiled"``, ``"foreach"`` or ``"single"`` for ``p``: compiled tensors of at
        least ``COMPILED_MIN_NUMEL`` elements (counted on the whole tensor, so a shard takes
        its tensor's route); FP4 rounding into a non-fp32 ``p`` and FP4 rows that are not
        whole MX blocks (their slices follow rows) one tensor at a time."""
        fp4 = storage == "fp4_e2m1"
        if fast and self._owner(p).numel() >= COMPILED_MIN_NUMEL and not (
                fp4 and p.dtype != torch.float32):
            return "compiled"
        if fp4 and _row(p) % 32 and p.numel() > _SLICE:
            return "single"
        return "foreach" if batch or fast else "single"

    @staticmethod
    def _target(p: Tensor, state: dict[str, Any], group: dict[str, Any], rounding: str,
                fused: bool) -> _Target:
        """``p``'s :class:`_Target` (``fused``: the compiled kernel computes it)."""
        storage = STORAGE_FORMATS[group["storage"]] and group["storage"]
        bf16 = group["storage"] == "bf16" or (group["storage"] is None
                                              and p.dtype == torch.bfloat16)
        keys = None
        if rounding == "stochastic" and (bf16 or storage):
            words = derive_keys(group["seed"], state["index"], state["step"], _PURPOSE_ROUND)
            keys = torch.tensor(words, dtype=torch.int32, device=p.device)
        row = _row(p)
        size = _SLICE if storage != "fp4_e2m1" or row % 32 == 0 else (
            max(1, _SLICE // row) * row)
        return _Target(rounding if bf16 else None, storage, keys, state.get("offset"), size,
                       direct=storage == "fp4_e2m1" and not fused)


def _state_dtype(
    name: torch.dtype | str | None, p: Tensor, *, second_moment: bool
) -> torch.dtype:
    """The dtype of a state tensor of ``p`` under ``state_dtype=name``. The default keeps a
    second moment in fp32 whatever ``p`` is: with ``beta2 = 0.999`` a bf16 ``v`` cannot decay
    (``0.999 * v`` rounds back to ``v``: after one gradient of 1 and 500 of 1e-3 it holds
    9.995e-4 where the EMA is 6.07e-4), which inflates the denominator and stalls the step."""
    if name is None:
        bf16 = p.dtype == torch.bfloat16 and not second_moment
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name) if isinstance(name, str) else name
