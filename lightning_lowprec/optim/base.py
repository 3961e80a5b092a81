"""What LMD, M+Adam and Madam share: validation, non-finite skipping, the AdamW rule, loading.

* **Validation.** :func:`require` raises a ``ValueError`` that names the argument, the bad value
  and the valid range.
* **Non-finite gradients.** Before any state is touched, each parameter's gradient is checked
  (on GPUs ``max |g|`` per tensor, squared in fp32; on CPU the fp32 sum of ``g**2``, compiled
  for the large gradients of ``compiled`` groups; one host synchronisation per step). Both
  also flag a finite gradient whose square overflows fp32 (``|g| > 1.8e19``; on CPU also a
  sum of squares above 3.4e38): its second moment would become inf and the next step's EMA
  ``inf + w * (x - inf)`` NaN. A parameter whose gradient holds a NaN, an inf or such a value
  is left exactly
  as it was, weights and state, its step counter does not advance, and ``state["skipped"]``
  counts the skip; ``optimizer.skipped_steps`` is the total over parameters. The other
  parameters of the same step are updated normally. A ``RuntimeWarning`` names the skipped
  parameters (their names when the optimizer was given ``named_parameters()``, else group,
  position and shape) at the 1st, 10th, 100th, ... step with a skip, so a run that keeps
  skipping is neither silent nor flooded. ``nonfinite="raise"`` instead raises
  ``FloatingPointError`` naming them, before any weight or state changes.
* **The AdamW rule.** Tensors these optimizers should not handle multiplicatively (1-D norm
  weights and biases, all-zero tensors a multiplicative update can never move) get plain
  decoupled-weight-decay Adam with fp32 state, chosen per group by ``adamw="auto" | "always" |
  "never"``; its learning rate is ``adamw_lr_ratio * lr`` so that a schedule on ``lr`` (LitGPT's
  ``pretrain`` rewrites every group's ``lr`` each step) moves both rules together. Into bf16
  and fp16 parameters (a norm weight at 1.0 in bf16 ignores any step below ``2**-8``) its
  result is rounded stochastically, unbiased, from (seed, parameter, step)
  (:mod:`~lightning_lowprec.optim.rounding`): the weight moves by ``lr`` per step in
  expectation, DDP ranks stay identical and a resumed run rounds as the uninterrupted one.
* **Kernels.** ``compiled="auto"`` (the default) runs each large tensor's update as one
  ``torch.compile``'d kernel wherever :func:`compile_works` for the parameters' device, and
  otherwise the eager kernels after one warning that says why; ``foreach=None`` follows
  torch's rule for the eager kernels (``torch._foreach_*`` on CUDA, one tensor at a time on
  CPU, where batching gains nothing and holds every temporary at once).
  :func:`use_compiled` and :func:`use_foreach` resolve the two settings.
* **FSDP2.** ``DTensor`` parameters (``ModelParallelStrategy``) are updated shard by shard
  with the same kernels, and every per-tensor decision is taken on the whole tensor
  (:mod:`~lightning_lowprec.optim.sharded`), so a step does not depend on the world size.
* **Loading.** ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to
  its parameter's dtype; these optimizers keep fp32 state beside bf16 weights (a bf16 log-median
  or second moment would stall), so :meth:`LowPrecisionOptimizer.load_state_dict` casts each
  to the dtype the optimizer keeps it in: the saved one (resuming is bit-exact), or fp32 for
  the bf16 second moments of older checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowprec.optim import sharded
from lightning_lowprec.optim.counter_rng import derive_keys
from lightning_lowprec.optim.rounding import STOCHASTIC_DTYPES, round_stochastic

__all__ = [
    "ADAMW_MODES", "COMPILED_MIN_NUMEL", "COMPILE_ENV", "EXP_NORMAL_RANGE",
    "EXP_SMALL_BOUND", "LowPrecisionOptimizer", "NONFINITE_MODES", "by_device", "clamp_where",
    "STEP_SLICE", "compile_works", "compiled", "ema_", "exp_normal", "exp_small", "expm1_small",
    "flat_slices", "flip_sign", "is_real", "require", "require_betas", "require_range",
    "shared_seed", "shifted", "slice_batches", "use_compiled", "use_foreach",
]

AdamWMode = Literal["auto", "always", "never"]
ADAMW_MODES: tuple[str, ...] = ("auto", "always", "never")
NonFiniteMode = Literal["skip", "raise"]
NONFINITE_MODES: tuple[str, ...] = ("skip", "raise")
CompiledMode = Literal[True, False, "auto"]

_log = logging.getLogger("lightning_lowprec.optim")

_COMPILED: dict[Callable, Callable] = {}
_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}
_PURPOSE_ADAMW_ROUND = 4
"""The AdamW rule's rounding stream (LMD's own streams are 1-3, M+Adam's rounding 3)."""
RECOMPILE_LIMIT = 64
"""Graphs one compiled optimizer kernel may build: the product of the dtypes and static flags
it is called with is finite and far below this (the ``"auto"`` path never sees a value here
grow with training: shapes are dynamic and hyperparameters are tensors)."""
COMPILED_MIN_NUMEL = 1 << 16
"""Smaller tensors take the ``foreach`` ops even on the ``compiled`` path: a compiled call
costs 0.05-0.2 ms in Python and guards (measured), the work of ~100K elements, while one batch
of ``torch._foreach_*`` ops serves all small tensors together (same arithmetic up to ulps)."""


def require(ok: bool, name: str, value: Any, valid: str) -> None:
    """Raise ``ValueError("Invalid <name>: <value!r>; expected <valid>.")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected {valid}.")


def is_real(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require_range(
    name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
    low_open: bool = False, high_open: bool = False,
) -> None:
    """Require a finite number in the interval ``low..high`` (closed unless ``*_open``)."""
    ok = is_real(value) and (low < value if low_open else low <= value)
    ok = ok and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, name, value, f"a finite number in {interval}")


def require_betas(name: str, betas: Any) -> None:
    """Validate a pair of EMA coefficients, each in [0, 1)."""
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2
    ok = ok and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)
    require(ok, name, betas, "two numbers in [0, 1)")


def compiled(fn: Callable) -> Callable:
    """``fn`` (whose first argument is the parameter) through ``torch.compile``, on 1-D views.

    Every tensor argument is flattened and those of the parameter's size are marked dynamic,
    so one compiled graph per dtype and flag combination serves every parameter shape;
    hyperparameters arrive as tensors, so a learning-rate change does not recompile either.
    Nothing else is dynamic: Python-number constants in ``fn`` stay literals of the generated
    kernel (``torch.compile(dynamic=True)`` would turn each into a run-time input that the
    loop reloads for every vector of 8 elements, measured 10 % of Madam's step). The C++
    kernels are built with ``-ffp-contract=fast`` (Inductor's default is ``off``), so
    ``a * b + c`` becomes one fused multiply-add, rounded once: more accurate, and Madam's
    compiled kernel 15 % faster on CPU (measured); Triton contracts on GPUs anyway. A result
    of the parameter's flat size comes back in the parameter's shape. A non-contiguous
    parameter (which has no flat view to write through) runs ``fn`` eagerly. The compiled
    function is built once per process, with its own recompile limit of
    :data:`RECOMPILE_LIMIT`: each dtype and flag combination is one more graph, and a process
    that meets many of them (bf16 and fp32 parameters, several storages or optimizers) would
    pass Dynamo's default of 8, which under ``fullgraph=True`` is an error, not a fallback.
    """
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(
            fn, dynamic=False, fullgraph=True, options=_OPTIONS, recompile_limit=RECOMPILE_LIMIT
        )
    inner = _COMPILED[fn]

    def call(p: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not p.is_contiguous():
            return fn(p, *args, **kwargs)
        flat = [p.view(-1)] + [a.reshape(-1) if isinstance(a, Tensor) else a for a in args]
        for t in flat:
            if isinstance(t, Tensor) and t.numel() == p.numel():
                torch._dynamo.maybe_mark_dynamic(t, 0)
        out = inner(*flat, **kwargs)
        return out.view_as(p) if isinstance(out, Tensor) and out.shape == flat[0].shape else out

    return call


def _probe(x: Tensor) -> Tensor:
    return x * 2.0 + 1.0


_COMPILE_WORKS: dict[str, bool] = {}
COMPILE_ENV = "LIGHTNING_LOWPREC_COMPILE"
"""Set to ``0``, this environment variable makes ``compiled="auto"`` pick the eager kernels
without probing or warning (e.g. a test suite, or a debugging session that should not wait
for the compiler); ``compiled=True`` still compiles."""


def compile_works(device: torch.device) -> bool:
    """Whether ``torch.compile`` builds and runs the optimizers' kernels on ``device``'s type.

    Probed once per process and device type (a tiny element-wise kernel is compiled and run,
    about a second the first time) and cached. Compiled kernels are built for CPU (Inductor's
    C++ backend, which needs a working C++ compiler) and CUDA (Triton). Where the probe fails,
    one ``RuntimeWarning`` names the reason and ``compiled="auto"`` runs the eager kernels.
    ``LIGHTNING_LOWPREC_COMPILE=0`` (:data:`COMPILE_ENV`) answers ``False`` without a probe.
    """
    if os.environ.get(COMPILE_ENV, "").strip() == "0":
        return False
    if device.type not in _COMPILE_WORKS:
        reason = _compile_failure(device)
        _COMPILE_WORKS[device.type] = reason is None
        if reason is not None:
            warnings.warn(
                f"compiled='auto': torch.compile does not work on {device.type} ({reason}); "
                "LMD, MPlusAdam and Madam run their eager kernels, 5-20x slower per step. "
                "Pass compiled=False to choose them explicitly.", RuntimeWarning, stacklevel=3,
            )
    return _COMPILE_WORKS[device.type]


def _compile_failure(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot serve ``device`` (``None`` if it can)."""
    if device.type not in ("cpu", "cuda"):
        return "the compiled kernels are built for CPU and CUDA only"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is missing or does not support this GPU"
    try:
        x = torch.arange(8, dtype=torch.float32, device=device)
        fn = torch.compile(_probe, dynamic=False, fullgraph=True, options=_OPTIONS)
        ok = torch.equal(fn(x), _probe(x))
    except Exception as err:  # any failure of the toolchain means: do not compile
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return f"{type(err).__name__}: {first_line}"
    return None if ok else "the probe kernel computed wrong values"


def use_compiled(group: dict[str, Any], device: torch.device) -> bool:
    """Whether ``group``'s tensors on ``device`` take the compiled kernels (``"auto"``:
    :func:`compile_works`)."""
    mode = group["compiled"]
    return compile_works(device) if mode == "auto" else mode


def use_foreach(group: dict[str, Any], device: torch.device) -> bool:
    """Whether ``group``'s eager kernels on ``device`` batch tensors with ``torch._foreach_*``.

    ``foreach=None`` is torch's rule: on CUDA, where one launch per op instead of one per
    tensor saves time, not on CPU, where a batched op is a loop over the tensors anyway and
    holds all their temporaries at once. The compiled path batches its small tensors (those
    it does not compile) either way.
    """
    if group["foreach"] is not None:
        return group["foreach"]
    return device.type == "cuda" or use_compiled(group, device)


def ema_(avg: Tensor, x: Tensor, weight: Any, low: bool) -> Tensor:
    """``avg.lerp_(x, weight)``; with ``low`` (the caller knows ``|weight| < 0.5``) spelled
    ``avg + weight * (x - avg)``, the branch ``lerp`` takes there, bit for bit. Inductor's
    ``lerp`` with a tensor weight computes both branches and selects per element; M+Adam's
    compiled step got 14 % faster without (measured)."""
    if low:
        return avg.add_((x - avg).mul_(weight))
    return avg.lerp_(x, weight)


def clamp_where(x: Tensor, low: Any, high: Any) -> Tensor:
    """``x.clamp(low, high)`` (for ``low <= high``; NaN stays NaN) as two ``where``: the same
    values in 4 vector instructions per 8 elements where Inductor's ``clamp`` takes 6."""
    return torch.where(x > high, high, torch.where(x < low, low, x))


_SIGN_BIT = -(1 << 31)


def flip_sign(x: Tensor, s: Tensor) -> Tensor:
    """``x`` with its sign flipped where ``s`` is negative (or ``-0.0``): ``-x`` there, else
    ``x``; ``x`` and ``s`` fp32. Two integer instructions on the sign bit, where the
    ``torch.where(s < 0, -x, x)`` it replaces takes three (Madam's compiled kernel 6 % faster,
    measured)."""
    bits = x.view(torch.int32) ^ (s.view(torch.int32) & _SIGN_BIT)
    return bits.view(torch.float32)


EXP_SMALL_BOUND = 0.125
"""Where :func:`exp_small` and :func:`expm1_small` are accurate: ``|x| <= EXP_SMALL_BOUND``.
It covers the defaults' exponents: Madam's ``lr * g_bound = 0.1``, M+Adam's ``<= 0.05``."""


def expm1_small(x: Tensor) -> Tensor:
    """``exp(x) - 1`` for ``|x| <= EXP_SMALL_BOUND``: degree-5 Taylor polynomial, Horner form.

    For the compiled kernels. Inductor's CPU ``exp`` is a call into SLEEF that spills the
    loop's registers (measured 0.6 ns per element on one core, half of what a whole fused
    AdamW step takes per element), and its ``expm1`` is ``exp(x) - 1``, which loses every digit
    near 0. These five multiply-adds stay inline. Error (measured against float64 on 4M
    points): at most 2.0 ulp of ``expm1``; the truncation error ``x**6 / 6!`` is below 0.1
    ulp. The literal coefficients are ``1/k!``.
    """
    y = x * 8.333333333333333e-03 + 4.1666666666666664e-02
    y = y * x + 0.16666666666666666
    y = y * x + 0.5
    y = y * x + 1.0
    return y * x


def exp_small(x: Tensor) -> Tensor:
    """``exp(x)`` for ``|x| <= EXP_SMALL_BOUND`` (see :func:`expm1_small`): at most 0.71 ulp."""
    return expm1_small(x) + 1.0


EXP_NORMAL_RANGE = (-86.0, 88.0)
"""Where :func:`exp_normal` is accurate: every result lies in float32's normal range."""


def exp_normal(x: Tensor) -> Tensor:
    """``exp(x)`` for ``x`` in ``EXP_NORMAL_RANGE``, inline (see :func:`expm1_small` for why).

    ``exp(x) = 2**n * exp(r)`` with ``n = round(x / ln 2)`` and ``r = x - n ln 2`` (ln 2 split
    in two, Cody-Waite, so ``r`` is float32-accurate; ``|r| <= 0.35``), ``exp(r)`` by its Taylor
    polynomial of degree 7, and ``2**n`` added to the exponent bits (valid because the result
    is normal).
    At most 1.2 ulp (measured against float64); outside the range the bits are garbage, and
    no clamp guards against that (two clamps cost LMD's compiled step 20 %).
    """
    n = torch.round(x * 1.4426950408889634)
    r = x - n * 0.693145751953125 - n * 1.4286068203094173e-06
    y = r * 1.984126984126984e-04 + 1.388888888888889e-03
    y = y * r + 8.333333333333333e-03
    y = y * r + 4.1666666666666664e-02
    y = y * r + 0.16666666666666666
    y = y * r + 0.5
    y = y * r + 1.0
    y = y * r + 1.0
    return (y.view(torch.int32) + (n.to(torch.int32) << 23)).view(torch.float32)


def _quarterable(g: Tensor, numel: int) -> bool:
    """Whether :func:`_quarter_sum` takes ``g`` (a gradient or its local shard) of a tensor of
    ``numel`` elements in all: large as a whole (a shard of a large tensor takes the same
    route on any number of ranks), contiguous, a multiple of 4 long."""
    return numel >= COMPILED_MIN_NUMEL and g.numel() % 4 == 0 and g.is_contiguous()


def _quarter_sum(g: Tensor) -> Tensor:
    """The fp32 sum of ``g**2`` for flat ``g``, read as four streams: the squares of its
    quarters are added element-wise, then summed, in one compiled loop (four streams leave
    less memory bandwidth unused than one). Non-finite when an element is or a square or
    the sum overflows, like ``torch.linalg.vector_norm``'s, which may overflow at another
    partial sum."""
    q = g.view(4, -1).float()
    return (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sum()


def _fp32_norm(g: Tensor) -> Tensor:
    """The fp32 norm of ``g``: non-finite iff an element, a square or the sum of squares is
    (no rescaling on CPU), and cheaper there than torch's max-abs reduction.

    ``vector_norm(g, dtype=torch.float32)`` of a bf16 or fp16 ``g`` first converts all of it
    to fp32: a whole-tensor temporary of 4 bytes per element. So a contiguous ``g`` of
    another dtype is taken in :func:`flat_slices` (1 MiB per fp32 slice) and the slices'
    norms are combined by their norm, ``sqrt(sum of squares)`` again (which may overflow at
    another partial sum, like any order of summation). fp32 gradients take one call.
    """
    if g.dtype == torch.float32:
        return torch.linalg.vector_norm(g, dtype=torch.float32)
    norms = [torch.linalg.vector_norm(s, dtype=torch.float32) for _, (s,) in flat_slices((g,))]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def shared_seed(seed: int | None) -> int:
    """``seed``, or when ``None`` one drawn from torch's global generator; under an initialised
    ``torch.distributed`` of several processes, rank 0's draw, broadcast to every rank.

    Why: LMD's samples (and its ``moment_matched`` initialisation) and M+Adam's stochastic
    rounding are pure functions of the seed; ranks with different seeds (no
    ``seed_everything``) would train at different samples, and with a moment-matched start,
    LMD's ``separate_momentum`` or stochastic rounding their weights would drift apart. The
    broadcast is a collective: build the optimizer on every rank, as DDP, Lightning and Fabric
    do.
    """
    if seed is not None:
        return seed
    drawn = int(torch.randint(0, 2**62, ()).item())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [drawn]
        dist.broadcast_object_list(box, src=0)
        drawn = box[0]
    return drawn


def _is_power_of_ten(n: int) -> bool:
    """Whether ``n`` is 1, 10, 100, ..."""
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1


def by_device(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by device (``torch._foreach_*`` needs one device)."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return list(groups.values())


STEP_SLICE = 1 << 18
"""Elements per slice of an eager step (1 MiB per fp32 temporary): an eager kernel's
temporaries then cost a few MiB whatever the tensor sizes (not up to 20 B per parameter at
once, as whole-tensor ``torch._foreach_*`` lists did), and they stay in cache between the
kernel's passes."""


def flat_slices(
    tensors: Sequence[Tensor | None], size: int = STEP_SLICE
) -> Iterator[tuple[int, list[Tensor | None]]]:
    """``(start, views)``: aligned flat views of at most ``size`` elements of ``tensors``
    (each ``None`` or of the first one's ``numel``), ``start`` the first element's index.

    Tensors that are not all contiguous (no flat view writes through) or not larger than
    ``size`` come back whole, as one ``(0, tensors)``.
    """
    n = next(t for t in tensors if t is not None).numel()
    if n <= size or not all(t is None or t.is_contiguous() for t in tensors):
        yield 0, list(tensors)
        return
    flats = [None if t is None else t.view(-1) for t in tensors]
    for a in range(0, n, size):
        yield a, [None if f is None else f[a : a + size] for f in flats]


def slice_batches(
    rows: Sequence[Sequence[Tensor | None]], size: int = STEP_SLICE
) -> Iterator[list[tuple[int, int, list[Tensor | None]]]]:
    """Batches of ``(row, start, views)`` of at most ``size`` elements in all, for the
    ``torch._foreach_*`` kernels: ``rows[i]`` are the aligned tensors of parameter ``i``
    (its parameter, gradient, states), cut by :func:`flat_slices`; small tensors share a batch
    (one launch per op for many of them), a large one spans several. A batch's temporaries
    therefore never exceed ``size`` elements per temporary list."""
    batch: list[tuple[int, int, list[Tensor | None]]] = []
    total = 0
    for i, row in enumerate(rows):
        for start, views in flat_slices(row, size):
            n = next(v for v in views if v is not None).numel()
            if batch and total + n > size:
                yield batch
                batch, total = [], 0
            batch.append((i, start, views))
            total += n
    if batch:
        yield batch


def uses_adamw(p: Tensor, mode: str) -> bool:
    """Whether the AdamW rule handles ``p`` under ``mode`` (decided once, at state creation)."""
    if mode == "auto":
        return p.ndim < 2 or not sharded.any_nonzero(p)
    return mode == "always"


def _write(p: Tensor, w: Tensor, keys: Tensor | None, offset: Tensor | None) -> None:
    """Write the fp32 result ``w`` into ``p``: rounded stochastically with ``keys`` (see
    :func:`~lightning_lowprec.optim.rounding.round_stochastic`), else by ``copy_``."""
    if keys is not None:
        p.copy_(round_stochastic(w, p.dtype, keys, offset))
    elif w is not p:
        p.copy_(w)


def shifted(offset: Tensor | None, start: int) -> Tensor | int | None:
    """The noise offset of a slice that begins ``start`` elements into a tensor (or shard)
    whose own offset is ``offset`` (``None``: 0), for :func:`flat_slices`."""
    if start == 0:
        return offset
    return start if offset is None else offset + start


def adamw_tensor(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, step: int, keys: Tensor | None = None,
    offset: Tensor | None = None,
) -> None:
    """One AdamW step on one tensor; math in fp32, ``m`` and ``v`` are fp32 state. With
    ``keys`` (a bf16 or fp16 ``p``) the result is rounded into ``p`` stochastically, from the
    noise of element ``offset`` on (a shard's global start) of the keys' stream. Runs in
    :func:`flat_slices`, so its temporaries are a few MiB whatever the tensor's size."""
    for start, (ps, gs, ms, vs) in flat_slices((p, g, m, v)):
        w = ps.float()
        gs = gs.float()
        w.mul_(1.0 - lr * weight_decay)
        ms.lerp_(gs, 1.0 - beta1)
        vs.mul_(beta2).addcmul_(gs, gs, value=1.0 - beta2)
        denom = vs.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
        w.addcdiv_(ms, denom, value=-lr / (1.0 - beta1**step))
        _write(ps, w, keys, shifted(offset, start))


def adamw_foreach(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, steps: list[int],
    keys: list[Tensor | None] | None = None, offsets: list[Tensor | None] | None = None,
) -> None:
    """:func:`adamw_tensor` over lists with ``torch._foreach_*`` ops (same arithmetic), in
    :func:`slice_batches`: one temporary list at a time of at most ``STEP_SLICE`` elements."""
    keys = keys or [None] * len(ps)
    offsets = offsets or [None] * len(ps)
    for batch in slice_batches(list(zip(ps, gs, ms, vs, strict=True))):
        bp, bg, bm, bv = (list(t) for t in zip(*(views for _, _, views in batch), strict=True))
        bsteps = [steps[i] for i, _, _ in batch]
        ws = [p.float() for p in bp]
        bg = [g.float() for g in bg]
        torch._foreach_mul_(ws, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(bm, bg, 1.0 - beta1)
        torch._foreach_mul_(bv, beta2)
        torch._foreach_addcmul_(bv, bg, bg, value=1.0 - beta2)
        denom = torch._foreach_sqrt(bv)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in bsteps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ws, bm, denom, [-lr / (1.0 - beta1**t) for t in bsteps])
        for (i, start, _), p, w in zip(batch, bp, ws, strict=True):
            _write(p, w, keys[i], shifted(offsets[i], start))


class LowPrecisionOptimizer(Optimizer):
    """Base class of :class:`~lightning_lowprec.LMD`, ``MPlusAdam`` and ``Madam`` (see module doc).

    Subclasses implement ``_validate_group(group)``, ``_init_state(p, group, state)`` and
    ``_update(group, params)`` for the parameters of ``group`` that have finite gradients and
    do not take the AdamW rule.
    """

    _renamed: dict[str, str] = {"betas": "adamw_betas"}
    """Group options renamed since older state dicts were saved: old name -> new name (the
    AdamW rule's ``betas`` of LMD and Madam, which torch's schedulers took for a momentum)."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        super().__init__(params, defaults)
        self._index: dict[Tensor, int] | None = None
        self._owners: dict[Tensor, Tensor] = {}
        self._reported: set[str] = set()
        self._skipping_steps = 0

    def _report_compile(self, what: str, start: float) -> None:
        """Log (INFO, once per optimizer and ``what``) how long the first compiled ``what``
        took since ``start`` (``time.perf_counter()``): mostly ``torch.compile`` building the
        kernels, which later calls reuse."""
        if what not in self._reported:
            self._reported.add(what)
            _log.info("%s: the first compiled %s took %.1f s (building the kernels; later "
                      "calls reuse them)", type(self).__name__, what, time.perf_counter() - start)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        """Raise the :func:`require` error for any bad hyperparameter of ``group`` that only
        this subclass has (the shared ones are :meth:`_check_group`'s)."""
        raise NotImplementedError

    def _check_group(self, g: dict[str, Any]) -> None:
        """The subclass's :meth:`_validate_group`, then the hyperparameters all three share."""
        self._validate_group(g)
        require(g["adamw"] in ADAMW_MODES, "adamw", g["adamw"], f"one of {ADAMW_MODES}")
        if "seed" in g:
            require(isinstance(g["seed"], int) and not isinstance(g["seed"], bool), "seed",
                    g["seed"], "an int (or None to draw one)")
        require(g["foreach"] in (None, True, False), "foreach", g["foreach"], "None or a bool")
        require(isinstance(g["compiled"], bool) or g["compiled"] == "auto", "compiled",
                g["compiled"], "True, False or 'auto'")
        require(isinstance(g["nonfinite"], str) and g["nonfinite"] in NONFINITE_MODES,
                "nonfinite", g["nonfinite"], f"one of {NONFINITE_MODES}")
        for old, new in self._renamed.items():
            require(not (old in g and new in g), old, g.get(old),
                    f"it as {new} (renamed: see {type(self).__name__}'s {new})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``Optimizer.__setstate__`` (also the end of ``load_state_dict``), filling options
        that an older state dict's groups lack with this optimizer's defaults (and reading
        a renamed one, :attr:`_renamed`, under its new name)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for old, new in self._renamed.items():
                if old in group and new in self.defaults:
                    group.setdefault(new, group.pop(old))
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @property
    def skipped_steps(self) -> int:
        """Parameter updates skipped because the gradient was not finite (summed over tensors)."""
        return sum(s.get("skipped", 0) for s in self.state.values())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group`` after validating the group filled with the defaults,
        so that a rejected group is not left in ``param_groups`` (its parameters would move)."""
        if isinstance(param_group, dict):
            if not isinstance(param_group["params"], (Tensor, set)):  # as torch will
                param_group["params"] = list(param_group["params"])
            self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._index = None

    def _param_index(self, p: Tensor) -> int:
        """Position of ``p`` among all parameters: names its random stream (stored in state)."""
        if self._index is None:
            flat = chain.from_iterable(g["params"] for g in self.param_groups)
            self._index = {q: i for i, q in enumerate(flat)}
        return self._index[p]

    def _state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, created on first use (from the weights, never from a gradient)."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["skipped"] = 0
            state["index"] = self._param_index(p)
            state["adamw"] = uses_adamw(p, group["adamw"])
            self._init_state(p, group, state)
            for key, value in state.items():  # state made from the local shard: lay it out
                if isinstance(value, Tensor):
                    state[key] = sharded.wrap_like(p, value)
        return state

    def _owner(self, p: Tensor) -> Tensor:
        """The parameter ``p`` stands for: itself, or the ``DTensor`` whose local shard it is
        (inside :func:`~lightning_lowprec.optim.sharded.local_view`)."""
        return self._owners.get(p, p)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Fill ``state`` (which already holds ``step``, ``skipped``, ``index``, ``adamw``)."""
        raise NotImplementedError

    def _state_dtype(self, p: Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        """The dtype this optimizer keeps ``p``'s floating state tensor ``key`` in: fp32 (LMD's
        log-medians and momentum, Madam's and the AdamW rule's moments), whatever ``p`` is."""
        return torch.float32

    @staticmethod
    def _init_adamw_state(p: Tensor, state: dict[str, Any]) -> None:
        """fp32 first and second moments of the AdamW rule."""
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def _finite_grads(self, params: list[Tensor], fast: list[bool]) -> list[bool]:
        """Per parameter: is its whole gradient finite? One host sync per device.

        ``fast[i]`` (the parameter's group is ``compiled``) lets a large CPU gradient take
        :func:`_quarter_sum`. A sharded gradient is checked on its local shard and the checks
        are summed (max-reduced on GPUs) over the shards in one collective.
        """
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        finite = [True] * len(params)
        for indices in by_device(params):
            grads = [sharded.local(params[i].grad) for i in indices]
            cpu = grads[0].device.type == "cpu"
            if cpu:
                checks = [
                    compiled(_quarter_sum)(g) if fast[i] and _quarterable(g, params[i].numel())
                    else _fp32_norm(g)
                    for i, g in zip(indices, grads, strict=True)
                ]
            else:  # one multi-tensor kernel; max |g| squared, in fp32
                checks = [c.float().square() for c in torch._foreach_norm(grads, float("inf"))]
            checks = sharded.global_sums(
                checks, [params[i] for i in indices],
                dist.ReduceOp.SUM if cpu else dist.ReduceOp.MAX,
            )
            for i, ok in zip(indices, torch.stack(checks).isfinite().tolist(), strict=True):
                finite[i] = ok
        return finite

    def _adamw_rule(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The AdamW rule (module doc) on ``params``; their ``step`` is already incremented."""
        beta1, beta2 = group["adamw_betas"]
        kwargs = dict(
            lr=group["lr"] * group["adamw_lr_ratio"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
        )
        states = [self.state[p] for p in params]
        keys = [self._rounding_keys(p, group, s) for p, s in zip(params, states, strict=True)]
        if not use_foreach(group, params[0].device):
            for p, s, k in zip(params, states, keys, strict=True):
                adamw_tensor(p, p.grad, s["exp_avg"], s["exp_avg_sq"], step=s["step"], keys=k,
                             offset=s.get("offset"), **kwargs)
            return
        for idx in by_device(params):
            adamw_foreach(
                [params[i] for i in idx], [params[i].grad for i in idx],
                [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                steps=[states[i]["step"] for i in idx], keys=[keys[i] for i in idx],
                offsets=[states[i].get("offset") for i in idx], **kwargs,
            )

    @staticmethod
    def _rounding_keys(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        """Keys of the stochastic rounding of the AdamW rule's write into a bf16 or fp16
        ``p`` (``None`` for other dtypes): a pure function of (seed, parameter, step)."""
        if p.dtype not in STOCHASTIC_DTYPES:
            return None
        words = derive_keys(group["seed"], state["index"], state["step"], _PURPOSE_ADAMW_ROUND)
        return torch.tensor(words, dtype=torch.int32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a finite gradient; returns the closure's loss.

        The closure (if any) is evaluated first, with gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run_step()
        return loss

    def _run_step(self) -> None:
        """Validate gradients, then update every parameter that has a finite one."""
        start = time.perf_counter()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            groups.append((group, params))
        fast = [use_compiled(g, p.device) for g, ps in groups for p in ps]
        finite = self._finite_grads([p for _, ps in groups for p in ps], fast)
        if not all(finite):
            self._report_nonfinite(groups, finite)
        finite = iter(finite)
        for group, params in groups:
            ok = []
            for p in params:
                state = self._state(p, group)
                if next(finite):
                    state["step"] += 1
                    ok.append(p)
                else:
                    state["skipped"] += 1
            adamw = [p for p in ok if self.state[p]["adamw"]]
            own = [p for p in ok if not self.state[p]["adamw"]]
            for rule, subset in ((self._adamw_rule, adamw), (self._update, own)):
                with sharded.local_view(self.state, subset, self._owners) as views:
                    if views:
                        rule(group, views)
        if any(fast):
            self._report_compile("step", start)

    def _report_nonfinite(
        self, groups: list[tuple[dict[str, Any], list[Tensor]]], finite: list[bool]
    ) -> None:
        """Raise for, or warn about (rate-limited), the parameters whose gradient is not
        finite (``finite`` is over the parameters of ``groups`` in order); see module doc."""
        flags = iter(finite)
        bad = [(group, p) for group, params in groups for p in params if not next(flags)]
        why = "is not finite (NaN or inf, or |g| > 1.8e19, whose square overflows fp32)"
        raising = [p for group, p in bad if group["nonfinite"] == "raise"]
        if raising:
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of {self._names(raising)} {why}; "
                "nonfinite='raise' stops before any weight or state changes (pass "
                "nonfinite='skip' to skip such updates instead)."
            )
        self._skipping_steps += 1
        count = self._skipping_steps
        if _is_power_of_ten(count):
            total = self.skipped_steps + len(bad)
            warnings.warn(
                f"{type(self).__name__} skipped the update of {len(bad)} parameter(s) whose "
                f"gradient {why}: {self._names([p for _, p in bad])}; their weights and state "
                f"are unchanged. Steps with skips so far: {count} ({total} skipped updates, "
                "optimizer.skipped_steps); this warning repeats at the 10th, 100th, ... such "
                "step. Pass nonfinite='raise' to stop at the first one.",
                RuntimeWarning, stacklevel=4,
            )

    def _names(self, params: list[Tensor], limit: int = 5) -> str:
        """``params`` as their names (from ``named_parameters()``), else as group index (and
        ``name``, from :func:`~lightning_lowprec.optim.param_groups`), position and shape."""
        where = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if names is not None:
                    where[p] = f"{names[j]!r} (shape {tuple(p.shape)})"
                else:
                    label = f" ({group['name']!r})" if "name" in group else ""
                    where[p] = f"group {gi}{label} parameter {j} (shape {tuple(p.shape)})"
        shown = ", ".join(where[p] for p in params[:limit])
        return shown + (f" and {len(params) - limit} more" if len(params) > limit else "")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, with every floating state tensor in the dtype this
        optimizer keeps it in (:meth:`_state_dtype`), not the parameter's: the saved dtype
        for a current checkpoint, so resuming is bit-exact; an older checkpoint's bf16 second
        moments are widened to fp32 (exactly)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = ((g, p) for g in self.param_groups for p in g["params"])
        for pid, (group, p) in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor):
                    dtype = self._state_dtype(p, group, key) if value.is_floating_point() else None
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)
        self._index = None
