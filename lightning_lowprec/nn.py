"""Linear layers whose matmuls run on MX/FP8-quantized operands.

:class:`QuantizedLinear` is an ``nn.Linear`` whose forward multiplies fake-quantized operands:
the input and the weight are rounded onto a format's grid with MX blocks running along
``in_features``, the reduction axis of the matmul, as MX hardware would see them. The matmul
itself runs in the working dtype, which is exact for the quantized values up to the
accumulation order. With ``backend="scaled_mm"`` (or ``"auto"`` on a GPU that has the
kernels) the same quantized operands are float8 tensors multiplied on FP8 tensor cores; see
:mod:`lightning_lowprec.scaled_mm`.

:func:`quantize_linears` turns the ``nn.Linear`` layers of any model into ``QuantizedLinear``
in place, keeping every Parameter object, so an optimizer built beforehand still trains the
model and the ``state_dict`` does not change. The Lightning plugins in
:mod:`lightning_lowprec.plugin` call it; it needs no Lightning.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_lowprec.formats import FORMATS, Format, parse
from lightning_lowprec.quantizer import ROUNDING_MODES, SCALE_RULES, Rounding, ScaleRule, quantize
from lightning_lowprec.scaled_mm import Backend, check_backend, scaled_mm_linear, use_scaled_mm

__all__ = ["FormatMap", "QuantizedLinear", "check_format_map", "layer_formats", "quantize_linears"]

FormatMap = Mapping[str, "str | Format | None"]
"""Per-layer formats: ``{module-name pattern: format}``; ``None`` keeps the layers it matches in
full precision. A layer takes the format of the first pattern (in mapping order) that matches
it; a layer no pattern matches is not quantized."""

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)
"""Layers left in full precision by default: the LM head, as FP8/MX recipes commonly do."""


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose matmuls multiply MX/FP8 fake-quantized operands.

    Same parameters, parameter names and ``state_dict`` as ``nn.Linear``; a checkpoint loads
    into either class. The bias is added in the working dtype and never quantized.

    Forward: ``y = Q_a(x) @ Q_w(W).T + b`` with the blocks of both ``Q`` along ``in_features``.

    Backward, ``quantize_backward=False`` (default, as in the LMD paper): straight-through. The
    gradients are those of the matmul of the quantized operands, computed in the working
    dtype: ``dx = g @ Q_w(W)`` and ``dW = g.T @ Q_a(x)``. The backward keeps ``Q_a(x)`` (in
    the working dtype, where ``F.linear`` would keep ``x``) and the weight itself, and
    quantizes the weight again for ``dx``, to the same bits: no weight-sized tensor lives from
    the forward to the backward (a plain ``nn.Linear`` under autocast keeps a bf16 copy).
    With ``rounding="stochastic"`` it keeps ``Q_w(W)`` instead (a new draw would change the
    gradient).

    Forwards that cannot change the weight (grad disabled, as in ``eval`` loops, or a frozen
    weight) reuse the quantized weight of the previous such forward while the weight is
    unchanged: any in-place write (optimizer step, ``load_state_dict``, a posterior
    ``sample_``) invalidates it, through the weight's version counter. The layer then holds
    one weight-sized tensor in the working dtype. Not under ``torch.compile`` or FSDP2, nor
    with stochastic rounding or a parametrized weight.

    Backward, ``quantize_backward=True``: both backward matmuls also run on quantized
    operands, each blocked along its own reduction axis (as ``microxcaling``'s ``mx.Linear``):
    ``dW = Q_g(g).T @ Q_a(x)`` with ``g`` and ``x`` blocked along the tokens (all leading
    dimensions flattened), and ``dx = Q_g(g) @ Q_w(W)`` with ``g`` and ``W`` blocked along
    ``out_features``. The bias gradient is not quantized. Only ``x`` and ``W`` themselves are
    saved; their quantized versions are recomputed in the backward.

    Under ``torch.autocast`` the matmuls run in the autocast dtype, as ``F.linear``'s would,
    but each operand is quantized from its own dtype (the fp32 weight, say) and only its
    quantized value is cast. Casting first would round twice: quantizing the bf16-rounded
    weight differs from quantizing the weight on 0.7% (MXFP4) to 13% (MXINT8) of the elements
    of a freshly initialised one. The cast after is exact for every MX format: an element has
    at most 8 significant bits (MXINT8's ``k/64``; the float elements 2 to 4) and its
    power-of-two scale keeps it in bf16's exponent range, so it is a bf16 value, except in
    blocks whose amax is below ``2**-102`` (E5M2; ``2**-116`` E4M3, ``2**-125`` or less the
    others) where bf16's subnormals end. (fp16, whose subnormals end at ``2**-24``, rounds the
    smallest elements of small blocks again either way, see :func:`quantize`.) For the
    per-tensor ``fp8_*`` formats the element codes fit bf16 too, but the operand is ``code *
    amax / max``, which in general is not a bf16 value: quantizing from fp32 gets the right
    codes and scale (a bf16 amax moves the scale of every element), and the cast rounds the
    dequantized operand once, as a bf16 matmul of it must. The gradient matmuls
    (``quantize_backward=True``) quantize the saved source-dtype ``x`` and ``W`` the same way.
    ``backend="scaled_mm"`` quantizes the same source-dtype operands to its float8 codes and
    scales, and its kernels write the autocast dtype.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        fmt: the format of every operand, a name from :data:`lightning_lowprec.FORMATS`
            (``"mxfp8_e4m3"``, ``"mxfp6_e2m3"``, ...); ``w_fmt``/``a_fmt``/``g_fmt`` override it
            per operand.
        w_fmt: format of the weight.
        a_fmt: format of the input activations.
        g_fmt: format of the output gradient; only with ``quantize_backward=True``.
        quantize_backward: quantize the backward matmuls too (see above).
        rounding: ``"even"``, ``"nearest"`` or ``"stochastic"``; see
            :func:`lightning_lowprec.quantize`.
        grad_rounding: the rounding of the output gradient ``g`` (``None``: ``rounding``);
            only with ``quantize_backward=True``. Round-to-nearest-even operands with
            stochastic gradients (``rounding="even", grad_rounding="stochastic"``) is a
            common MX training recipe: the gradient stays unbiased.
        scale_rule: how every MX operand's block scale is chosen (forward and quantized
            backward alike): ``"floor"`` (the OCP spec's, default) or ``"rceil"`` (NVIDIA's
            and torchao's MXFP8 rule, which saturates almost no block maximum); see
            :func:`lightning_lowprec.quantize`. No effect on the per-tensor ``fp8_*`` formats.
        backend: ``"emulated"`` (fake quantization, matmuls in the working dtype: any format,
            any device), ``"scaled_mm"`` (the same quantized operands as float8 tensors on FP8
            kernels, :mod:`lightning_lowprec.scaled_mm`: per-tensor FP8 on CUDA 8.9+ or CPU,
            MXFP8 on CUDA 10.x; equal to the emulation up to fp32/working-dtype rounding) or
            ``"auto"`` (default: ``scaled_mm`` where the input's CUDA device has kernels for
            the formats, else emulated; CPU stays emulated).

    Raises:
        ValueError: an unknown format, rounding mode, scale rule or backend, a missing
            format, ``g_fmt`` without ``quantize_backward=True``, or ``backend="scaled_mm"``
            with a format it cannot run; at the forward, ``backend="scaled_mm"`` on a device
            without kernels.
    """

    w_fmt: Format
    a_fmt: Format
    g_fmt: Format | None
    quantize_backward: bool
    rounding: Rounding
    grad_rounding: Rounding
    scale_rule: ScaleRule
    backend: Backend

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fmt: str | Format | None = None,
        w_fmt: str | Format | None = None,
        a_fmt: str | Format | None = None,
        g_fmt: str | Format | None = None,
        quantize_backward: bool = False,
        rounding: Rounding = "even",
        backend: Backend = "auto",
        grad_rounding: Rounding | None = None,
        scale_rule: ScaleRule = "floor",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        formats = _resolve_formats(fmt, w_fmt, a_fmt, g_fmt, quantize_backward)
        self._configure(
            *formats,
            quantize_backward,
            _check_rounding(rounding),
            check_backend(backend, *formats),
            _check_grad_rounding(grad_rounding, rounding, quantize_backward),
            _check_scale_rule(scale_rule),
        )

    def _configure(
        self,
        w_fmt: Format,
        a_fmt: Format,
        g_fmt: Format | None,
        quantize_backward: bool,
        rounding: Rounding,
        backend: Backend,
        grad_rounding: Rounding | None = None,
        scale_rule: ScaleRule = "floor",
    ) -> None:
        """Set the quantization settings (already validated); used on re-classed layers too."""
        self.w_fmt, self.a_fmt, self.g_fmt = w_fmt, a_fmt, g_fmt
        self.quantize_backward = quantize_backward
        self.rounding = rounding
        self.grad_rounding = rounding if grad_rounding is None else grad_rounding
        self.scale_rule = scale_rule
        self.backend = backend
        self._weight_cache = None  # see _cached_weight

    def forward(self, input: Tensor) -> Tensor:
        return self._matmul(input, self.weight, self.bias)

    def __getstate__(self) -> dict:
        # Pickles and deep copies leave the quantized-weight cache behind (a copy's own weight
        # would never match it anyway).
        return {**self.__dict__, "_weight_cache": None}

    def _matmul(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ weight.T + bias`` quantized; ``weight`` in the Linear layout ``[out, in]``."""
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return self._quantized_linear(x, weight, bias, None)
        # The operands are quantized from their own (fp32) values and cast to the autocast
        # dtype after (see the class doc); the matmul runs with autocast off so that nothing
        # is cast again.
        dtype = torch.get_autocast_dtype(device_type)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return self._quantized_linear(x, weight, bias, dtype)

    def _quantized_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None
    ) -> Tensor:
        """The quantized ``F.linear`` with the matmul in ``dtype`` (``None``: the operands')."""
        if use_scaled_mm(self.backend, x.device, self.w_fmt, self.a_fmt, self.g_fmt):
            return scaled_mm_linear(
                x, weight, bias, self.w_fmt, self.a_fmt, self.g_fmt, self.rounding,
                self.grad_rounding, self.scale_rule, dtype,
            )
        if self.quantize_backward:
            return _QuantizedLinearFunction.apply(
                x, weight, bias, _cached_weight(self, weight, dtype),
                *_by_name(self.w_fmt, self.a_fmt, self.g_fmt), self.rounding, self.grad_rounding,
                self.scale_rule, dtype,
            )
        return _StraightThroughLinear.apply(
            x, weight, bias, _cached_weight(self, weight, dtype),
            *_by_name(self.w_fmt, self.a_fmt), self.rounding, self.scale_rule, dtype,
        )

    def extra_repr(self) -> str:
        formats = {"w_fmt": self.w_fmt, "a_fmt": self.a_fmt, "g_fmt": self.g_fmt}
        if self.g_fmt is None:
            del formats["g_fmt"]
        if len(set(formats.values())) == 1:
            shown = f"fmt={self.w_fmt.name}"
        else:
            shown = ", ".join(f"{key}={f.name}" for key, f in formats.items())
        extra = f", quantize_backward={self.quantize_backward}"
        if self.rounding != "even":
            extra += f", rounding={self.rounding}"
        if self.grad_rounding != self.rounding:
            extra += f", grad_rounding={self.grad_rounding}"
        if self.scale_rule != "floor":
            extra += f", scale_rule={self.scale_rule}"
        if self.backend != "auto":
            extra += f", backend={self.backend}"
        return f"{super().extra_repr()}, {shown}{extra}"


class _StraightThroughLinear(torch.autograd.Function):
    """``F.linear(Q_a(x), Q_w(W), bias)`` with the straight-through backward (forward-only mode).

    Keeps ``Q_a(x)`` and, instead of ``Q_w(W)``, the weight: the backward quantizes it again
    (the same bits for deterministic rounding), so no weight-sized copy is held from forward to
    backward. ``w_q``, where given, is the quantized weight already (the layer's cache, which
    holds it anyway): it is used and kept as it is, as is ``Q_w(W)`` under stochastic
    rounding. The backward's matmuls are those of autograd for ``F.linear``: the gradients
    are bit for bit the same as those of ``F.linear`` on the quantized operands.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w_q, w_fmt, a_fmt, rounding, scale_rule, dtype):
        w_fmt, a_fmt = parse(w_fmt), parse(a_fmt)
        x_q = _quantize_to(x, a_fmt, -1, rounding, dtype, scale_rule)
        again = w_q is None and rounding != "stochastic"
        if w_q is None:
            w_q = _quantize_to(weight, w_fmt, -1, rounding, dtype, scale_rule)
        ctx.save_for_backward(x_q, weight if again else w_q)
        ctx.settings = (w_fmt, rounding, scale_rule, dtype, again, x.dtype, weight.dtype)
        ctx.has_bias = bias is not None
        return F.linear(x_q, w_q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_q, w = ctx.saved_tensors
        w_fmt, rounding, scale_rule, dtype, again, x_dtype, w_dtype = ctx.settings
        grad_x = grad_w = grad_b = None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            w_q = _quantize_to(w, w_fmt, -1, rounding, dtype, scale_rule) if again else w
            grad_x = g.mm(w_q).reshape(*grad_out.shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().mm(x_q.reshape(-1, x_q.shape[-1])).to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _QuantizedLinearFunction(torch.autograd.Function):
    """``F.linear`` with all three matmuls (forward, input and weight gradient) quantized.

    The operands are quantized in their own dtype and cast to ``dtype`` (the matmul's;
    ``None``: theirs) after; the gradients come back in the dtypes of ``x`` and ``weight``.
    ``w_q``, where given, is the forward's quantized weight from the layer's cache.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, w_q, w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule, dtype
    ):
        w_fmt, a_fmt, g_fmt = parse(w_fmt), parse(a_fmt), parse(g_fmt)
        ctx.save_for_backward(x, weight)
        ctx.settings = (w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule, dtype)
        ctx.has_bias = bias is not None
        x_q = _quantize_to(x, a_fmt, -1, rounding, dtype, scale_rule)
        if w_q is None:
            w_q = _quantize_to(weight, w_fmt, -1, rounding, dtype, scale_rule)
        return F.linear(x_q, w_q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        w_fmt, a_fmt, g_fmt, rounding, grad_rounding, scale_rule, dtype = ctx.settings
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dx = g @ W sums over out_features: g along its last axis, W (out, in) along 0.
            w_q = _quantize_to(weight, w_fmt, 0, rounding, dtype, scale_rule)
            g_q = quantize(grad_out, g_fmt, -1, grad_rounding, scale_rule=scale_rule)
            grad_x = (g_q @ w_q).to(x.dtype)
        tokens_g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            # dW = g.T @ x sums over the tokens: both blocked along the (flattened) token axis.
            tokens_x = x.reshape(-1, x.shape[-1])
            x_q = _quantize_to(tokens_x, a_fmt, 0, rounding, dtype, scale_rule)
            g_q = quantize(tokens_g, g_fmt, 0, grad_rounding, scale_rule=scale_rule)
            grad_w = (g_q.T @ x_q).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = tokens_g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def _cached_weight(layer: nn.Module, weight: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    """The forward's quantized ``weight`` (blocks along ``in``, cast to ``dtype``) from
    ``layer``'s cache, quantized and stored on a miss; ``None`` where no cache applies.

    An eval forward, or any forward of a frozen weight, would otherwise quantize an unchanged
    weight again each time (a generation step quantizes every weight for one token). The
    entry is valid while its key holds: the same parameter object (a weak reference, so that a
    new tensor at a freed address never matches), data pointer, shape, strides and version
    counter, which every in-place write bumps (optimizer steps, ``load_state_dict``, the
    posterior's ``sample_``/``restore_``), and the same format, rounding, scale rule, dtype,
    device and inference mode. Writes through ``.data`` bypass the version counter and are not seen.
    One entry per layer, holding one weight-sized tensor in the working dtype.

    No cache (and the entry is dropped) when: compiling (the graph quantizes the weight itself,
    and no module state changes under Dynamo); the weight requires grad in a grad-enabled
    forward (training: the entry would be the weight-sized copy the backward no longer keeps,
    for a saving only on accumulation micro-batches); ``rounding="stochastic"`` (each forward
    draws anew); the weight is no plain ``nn.Parameter`` or a view of one (a parametrized
    weight is a new tensor each forward, a ``DTensor`` has no version counter of its own); the
    layer is managed by FSDP2 (``fully_shard`` all-gathers into the same storage without
    bumping the version, and the entry would keep the unsharded weight it frees).
    """
    if torch.compiler.is_compiling():
        return None
    source = weight if weight._base is None else weight._base
    if (
        layer.rounding == "stochastic"
        or (weight.requires_grad and torch.is_grad_enabled())
        or type(source) is not nn.Parameter
        or getattr(layer, "_is_fsdp_managed_module", False)
    ):
        layer._weight_cache = None
        return None
    key = (
        weight.data_ptr(), weight.shape, weight.stride(), weight._version, weight.device,
        layer.w_fmt, layer.rounding, layer.scale_rule, dtype, torch.is_inference_mode_enabled(),
    )
    cached = getattr(layer, "_weight_cache", None)
    if cached is not None and cached[0]() is source and cached[1] == key:
        return cached[2]
    with torch.no_grad():
        w_q = _quantize_to(weight, layer.w_fmt, -1, layer.rounding, dtype, layer.scale_rule)
    layer._weight_cache = (weakref.ref(source), key, w_q)
    return w_q


def _quantize_to(
    t: Tensor,
    fmt: Format,
    axis: int,
    rounding: Rounding,
    dtype: torch.dtype | None,
    scale_rule: ScaleRule = "floor",
) -> Tensor:
    """``quantize(t, fmt, axis, rounding, scale_rule=scale_rule)`` cast to ``dtype`` (``None``:
    ``t``'s dtype): quantized from the source dtype, then cast (every MX grid value is a bf16,
    so the cast is exact; casting first would round twice).

    Compiled, this stays in the graph also for a ragged MX axis: the quantizer's graph path
    quantizes the whole blocks and the short last block apart and concatenates them, which
    avoids the Inductor (torch 2.13) miscompile of the padded formulation (its fused output
    loop ran over ``length // 32`` blocks only and left the short last block unwritten when
    any pointwise op, this cast included, followed; issue 18).
    """
    q = quantize(t, fmt, axis, rounding, scale_rule=scale_rule)
    return q if dtype is None else q.to(dtype)


def _by_name(*formats: Format | None) -> tuple[str | Format | None, ...]:
    """Each format as its name where it is a built-in one, for ``autograd.Function.apply``.

    Under ``torch.compile(dynamic=True)`` Dynamo would make a ``Format``'s float fields
    symbolic inputs of the Function and fail to lift them (as :func:`quantize_ste` notes).
    """
    return tuple(
        f.name if f is not None and FORMATS.get(f.name) == f else f for f in formats
    )


def quantize_linears(
    model: nn.Module,
    fmt: str | Format | FormatMap | None = None,
    *,
    w_fmt: str | Format | None = None,
    a_fmt: str | Format | None = None,
    g_fmt: str | Format | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    quantize_backward: bool = False,
    rounding: Rounding = "even",
    backend: Backend = "auto",
    grad_rounding: Rounding | None = None,
    scale_rule: ScaleRule = "floor",
) -> list[str]:
    """Turn the selected ``nn.Linear`` layers of ``model`` into :class:`QuantizedLinear`, in place.

    Each selected layer is re-classed (``layer.__class__ = QuantizedLinear``): the module
    objects, their Parameter objects and the ``state_dict`` stay the same, so optimizers,
    hooks and references built earlier keep working. ``model`` itself is never replaced (it
    is re-classed if it is itself a selected ``nn.Linear``).

    Which layers: every module whose type is exactly ``nn.Linear``, also under a
    ``torch.nn.utils.parametrize`` parametrization such as learnable multipliers (the layer then
    quantizes the effective weight), and every ``QuantizedLinear`` (re-configured with these
    settings), that ``include`` selects and ``exclude`` does not. Other ``nn.Linear``
    subclasses keep their own forward and are left alone; embeddings and norms are never
    touched.

    Pattern rule: patterns are ``fnmatch`` globs (``*``, ``?``, ``[seq]``; ``*`` also matches
    dots) over the qualified names of ``model.named_modules()``. A pattern selects a layer
    when it matches the layer's name or the name of a module containing it, either whole or
    as a trailing run of dotted components. So ``"lm_head"`` matches ``lm_head`` and
    ``gpt.lm_head``, ``"attn"`` matches every Linear inside any ``...attn`` module,
    ``"transformer.h.0"`` matches all Linears of that block, and ``"*.proj"`` every ``proj``.

    Args:
        model: any ``nn.Module``.
        fmt, w_fmt, a_fmt, g_fmt, quantize_backward, rounding, backend, grad_rounding,
            scale_rule: as for :class:`QuantizedLinear`;
            ``fmt`` may also be a :data:`FormatMap` ``{pattern: format}`` giving each layer its
            own format (for all its operands; not combined with ``w_fmt``/``a_fmt``/``g_fmt``),
            e.g. what :func:`lightning_lowprec.policy.recommend_formats` returns.
        include: patterns of the layers to quantize; ``None`` selects every Linear.
        exclude: patterns of the layers to leave alone; applied after ``include``. The default
            leaves a language model's head (``lm_head``) in full precision.

    Returns:
        The qualified names of the layers that are now quantized with these settings.

    Raises:
        ValueError: bad settings (see :class:`QuantizedLinear`), a pattern that is not a string,
            or no layer selected (the message lists the model's Linear layers).

    Warns:
        UserWarning: for each pattern in ``include`` or ``exclude`` that matches no Linear
            (except the default ``exclude``, which many models have no match for).
    """
    rounding = _check_rounding(rounding)
    grad_rounding = _check_grad_rounding(grad_rounding, rounding, quantize_backward)
    scale_rule = _check_scale_rule(scale_rule)
    if isinstance(fmt, Mapping):
        _check_mapping_alone(w_fmt, a_fmt, g_fmt)
        _check_quantize_backward(quantize_backward)
        per_layer = layer_formats(model, fmt, include=include, exclude=exclude, _stacklevel=3)
        layers = dict(model.named_modules())
        checked = {f: check_backend(backend, f, f, f if quantize_backward else None)
                   for f in set(per_layer.values())}
        for name, f in per_layer.items():
            _configure(layers[name], (f, f, f if quantize_backward else None),
                       quantize_backward, rounding, checked[f], grad_rounding, scale_rule)
        return list(per_layer)
    formats = _resolve_formats(fmt, w_fmt, a_fmt, g_fmt, quantize_backward)
    backend = check_backend(backend, *formats)
    linears, selected = _select(model, include, exclude, stacklevel=3)
    for name in selected:
        _configure(linears[name], formats, quantize_backward, rounding, backend, grad_rounding,
                   scale_rule)
    return selected


def layer_formats(
    model: nn.Module,
    fmt: str | Format | FormatMap,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    _stacklevel: int = 2,
) -> dict[str, Format]:
    """The weight format each Linear layer of ``model`` gets from ``quantize_linears(model,
    fmt, include=..., exclude=...)``, by qualified name, in module order.

    One function decides it, so that quantizing, exporting (:func:`lightning_lowprec.export.
    export_mx`) and the format policy agree on which layer has which format.

    Raises:
        ValueError: an unknown format or a malformed mapping, or no layer selected.

    Warns:
        UserWarning: for each pattern (of ``include``, a non-default ``exclude``, or the
            mapping) that matches no Linear layer.
    """
    if not isinstance(fmt, Mapping):
        _, selected = _select(model, include, exclude, _stacklevel + 1)
        return dict.fromkeys(selected, parse(fmt))
    fmt_map = check_format_map(fmt)
    linears, selected = _select(model, include, exclude, _stacklevel + 1, extra=tuple(fmt_map))
    per_layer = {name: f for name in selected if (f := _mapped_format(name, fmt_map)) is not None}
    if not per_layer:
        raise ValueError(
            f"The format mapping {dict(fmt)!r} quantizes no Linear layer of "
            f"{type(model).__name__}. Linear layers: {_listing(linears)}."
        )
    return per_layer


def check_format_map(fmt: FormatMap) -> dict[str, Format | None]:
    """Validate a :data:`FormatMap`; return it with every format parsed.

    Raises:
        ValueError: an empty mapping, a pattern that is not a string, or an unknown format.
    """
    if not fmt:
        raise ValueError("A per-layer fmt mapping needs at least one 'pattern: format' entry.")
    out: dict[str, Format | None] = {}
    for pattern, f in fmt.items():
        if not isinstance(pattern, str):
            raise ValueError(
                f"The keys of a per-layer fmt mapping are module-name patterns (strings), got "
                f"{pattern!r}."
            )
        out[pattern] = None if f is None else parse(f)
    return out


def _mapped_format(name: str, fmt_map: Mapping[str, Format | None]) -> Format | None:
    """The format a checked :data:`FormatMap` gives the module ``name``: that of the first
    pattern matching it (``None``: no pattern, or a ``None`` entry)."""
    return next((f for pattern, f in fmt_map.items() if _matches(name, (pattern,))), None)


def _configure(
    layer: nn.Module,
    formats: tuple[Format, Format, Format | None],
    quantize_backward: bool,
    rounding: Rounding,
    backend: Backend,
    grad_rounding: Rounding | None = None,
    scale_rule: ScaleRule = "floor",
) -> None:
    """Make ``layer`` (an ``nn.Linear`` or ``QuantizedLinear``) quantize with these settings."""
    if not isinstance(layer, QuantizedLinear):
        layer.__class__ = _quantized_class(type(layer))
    layer._configure(*formats, quantize_backward, rounding, backend, grad_rounding, scale_rule)


def _select(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    stacklevel: int,
    extra: tuple[str, ...] = (),
) -> tuple[dict[str, nn.Module], list[str]]:
    """The model's Linear layers by name and the names ``include``/``exclude`` select.

    Warns (at ``stacklevel``) for every pattern of ``include``, a non-default ``exclude`` and
    ``extra`` that matches no Linear layer.

    Raises:
        ValueError: a pattern that is not a string, or no layer selected.
    """
    include_patterns = _check_patterns("include", include)
    exclude_patterns = _check_patterns("exclude", exclude)

    linears = {
        name: module
        for name, module in model.named_modules()
        if _layer_class(module) is nn.Linear or isinstance(module, QuantizedLinear)
    }
    checked = list(include_patterns or ())
    if exclude_patterns != DEFAULT_EXCLUDE:
        checked += exclude_patterns
    for pattern in [*checked, *extra]:
        if not any(_matches(name, (pattern,)) for name in linears):
            warnings.warn(
                f"The module-name pattern {pattern!r} matches no Linear layer of "
                f"{type(model).__name__}; Linear layers: {_listing(linears)}.",
                stacklevel=stacklevel,
            )

    selected = [
        name
        for name in linears
        if _is_selected(name, include_patterns, exclude_patterns)
    ]
    if not selected:
        raise ValueError(
            f"No Linear layer of {type(model).__name__} is selected for quantization "
            f"(include={include!r}, exclude={exclude!r}). Linear layers: {_listing(linears)}."
        )
    return linears, selected


def _layer_class(module: nn.Module) -> type:
    """The module's class, seen through torch's parametrization wrapper class if it has one."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _quantized_class(cls: type) -> type:
    """The class that makes an ``nn.Linear`` (``cls``, possibly parametrized) quantized.

    ``torch.nn.utils.parametrize`` gives each parametrized module its own subclass holding the
    parametrized tensors as properties (``ParametrizedLinear``); the same namespace over
    ``QuantizedLinear`` keeps them, so the layer quantizes the effective weight, and removing
    the parametrization later leaves a ``QuantizedLinear``.
    """
    if cls is nn.Linear:
        return QuantizedLinear
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{QuantizedLinear.__name__}", (QuantizedLinear,), namespace)


def _resolve_formats(
    fmt: str | Format | None,
    w_fmt: str | Format | None,
    a_fmt: str | Format | None,
    g_fmt: str | Format | None,
    quantize_backward: bool,
) -> tuple[Format, Format, Format | None]:
    """Validate the format arguments; return (weight, activation, gradient or None) formats."""
    _check_quantize_backward(quantize_backward)
    if g_fmt is not None and not quantize_backward:
        raise ValueError(
            f"g_fmt={g_fmt!r} only applies with quantize_backward=True: the default backward "
            "runs in the working dtype."
        )
    w_fmt = fmt if w_fmt is None else w_fmt
    a_fmt = fmt if a_fmt is None else a_fmt
    g_fmt = (fmt if g_fmt is None else g_fmt) if quantize_backward else None
    if w_fmt is None or a_fmt is None or (quantize_backward and g_fmt is None):
        raise ValueError(
            "No number format given: pass fmt (e.g. 'mxfp6_e2m3'), or w_fmt and a_fmt "
            "(and g_fmt with quantize_backward=True)."
        )
    return parse(w_fmt), parse(a_fmt), None if g_fmt is None else parse(g_fmt)


def _check_mapping_alone(*operand_formats: str | Format | None) -> None:
    """A per-layer mapping is each layer's one ``fmt``: refuse per-operand formats beside it."""
    if any(f is not None for f in operand_formats):
        raise ValueError(
            "A per-layer fmt mapping gives each layer one format for all its operands; pass "
            f"no w_fmt/a_fmt/g_fmt with it (got {', '.join(map(repr, operand_formats))})."
        )


def _check_quantize_backward(quantize_backward: bool) -> None:
    if not isinstance(quantize_backward, bool):
        raise ValueError(f"quantize_backward must be True or False, got {quantize_backward!r}.")


def _check_rounding(rounding: str) -> Rounding:
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Unknown rounding {rounding!r}. Valid modes: {', '.join(ROUNDING_MODES)}."
        )
    return rounding


def _check_scale_rule(scale_rule: str) -> ScaleRule:
    if scale_rule not in SCALE_RULES:
        raise ValueError(
            f"Unknown scale_rule {scale_rule!r}. Valid rules: {', '.join(SCALE_RULES)} "
            "(floor: the OCP MX spec's, the default)."
        )
    return scale_rule


def _check_grad_rounding(
    grad_rounding: str | None, rounding: str, quantize_backward: bool
) -> Rounding | None:
    """``grad_rounding`` validated: a rounding mode, or ``None`` (the gradient takes
    ``rounding``); only meaningful when the backward quantizes the gradient."""
    if grad_rounding is None:
        return None
    if grad_rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Unknown grad_rounding {grad_rounding!r}. Valid modes: "
            f"{', '.join(ROUNDING_MODES)}, or None (the same as rounding={rounding!r})."
        )
    if quantize_backward is not True:
        raise ValueError(
            f"grad_rounding={grad_rounding!r} rounds the quantized output gradient, which only "
            "quantize_backward=True quantizes; pass quantize_backward=True or drop it."
        )
    return grad_rounding


def _check_patterns(arg: str, patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Normalise include/exclude to a tuple of strings (a lone string is one pattern)."""
    if patterns is None:
        return None if arg == "include" else ()
    if isinstance(patterns, str):
        return (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"{arg} must be module-name patterns (strings), got {pattern!r} in {patterns!r}."
            )
    return patterns


def _is_selected(
    name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...]
) -> bool:
    """Whether checked ``include``/``exclude`` patterns select the module ``name``."""
    return (include is None or _matches(name, include)) and not _matches(name, exclude)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern matches ``name`` or a containing module's name (see quantize_linears)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(
        fnmatchcase(prefix, pattern) or fnmatchcase(prefix, "*." + pattern)
        for prefix in prefixes
        for pattern in patterns
    )


def _listing(linears: dict[str, nn.Module], limit: int = 12) -> str:
    """The first ``limit`` layer names, for error messages."""
    names = [name or "<the model itself>" for name in linears]
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
