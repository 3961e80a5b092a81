"""Packed MX checkpoints: the weights a model trained with, stored at the width it used.

A model trained with an MX forward is evaluated with that forward, yet a plain checkpoint keeps
its weights in fp32: four to eight times what the forward actually reads. :func:`export_mx`
writes each quantized weight as what MX hardware would hold, and :func:`load_mx` reads it back
**bit for bit** as ``quantize(W, fmt)``, the weight the training forward multiplied:

* element codes packed at their true width: FP4 two per byte, FP6 four per three bytes, FP8
  and MXINT8 one per byte (MXINT8 writes ``-0.0`` as the code ``0x80``, which the format leaves
  unused, so signed zeros survive);
* one E8M0 byte per block of 32 elements along the layer's reduction axis (``in_features``, the
  last axis of a Linear weight): ``2**(byte - 127)``, ``0xFF`` for a block that was NaN; the
  scale the layer's ``scale_rule`` chose (``"floor"``, the spec's, or ``"rceil"``), so a weight
  trained with either rule loads as the one its forward multiplied;
* everything that is not quantized (embeddings, norms, biases, the LM head) in its own dtype.

So a quantized weight costs ``bits + 8/32`` bits per element (4.25 / 6.25 / 8.25) plus 8 bits
per row for a last block that is shorter than 32. The file is `safetensors
<https://github.com/huggingface/safetensors>`_: a packed weight ``NAME`` is stored as the
``uint8`` tensors ``NAME.codes`` (flat) and ``NAME.scales`` (``[rows, blocks]``), and the
metadata entry ``"lightning_lowprec"`` (JSON) gives every tensor's format, dtype and shape, and
a packed one's ``scale_rule`` (which :class:`PackedLinear` quantizes its input with; an entry
without one is ``"floor"``).

Only the MX formats pack: a per-tensor ``fp8_*`` scale is no power of two, so those weights
could not be rebuilt bit for bit from codes and one scale.

Serving: ``load_mx(path)`` returns a plain state dict of dequantized weights (what ``litgpt
generate`` loads); ``load_mx(path, model, dequantize=False)`` keeps the packed bytes in the
model (:class:`PackedLinear`, decoding the weight in every forward).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_lowprec.formats import FORMATS, Format, parse
from lightning_lowprec.nn import (
    DEFAULT_EXCLUDE,
    FormatMap,
    QuantizedLinear,
    _check_patterns,
    _is_selected,
    _mapped_format,
    check_format_map,
    layer_formats,
)
from lightning_lowprec.quantizer import (
    _INPUT_DTYPES,
    SCALE_RULES,
    ScaleRule,
    _biased_shared_exponents,
    _grid_values,
    quantize,
)

__all__ = ["METADATA_KEY", "PackedLinear", "export_mx", "load_mx", "pack", "unpack"]

METADATA_KEY = "lightning_lowprec"
"""The safetensors metadata entry (JSON) describing every tensor of an export."""
FORMAT_VERSION = 1
_E8M0_BIAS = 127
_E8M0_NAN = 0xFF
_CODES, _SCALES = ".codes", ".scales"


def export_mx(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    fmt: str | Format | FormatMap | None,
    path: str | Path,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    scale_rule: ScaleRule | None = None,
) -> dict[str, str]:
    """Write a packed MX checkpoint of a model (or state dict) to ``path`` (safetensors).

    Args:
        model_or_state_dict: a model, or its ``state_dict()``.
        fmt: the weights' format, a per-layer mapping ``{pattern: format}``
            (:data:`~lightning_lowprec.nn.FormatMap`), or ``None`` for the formats of the
            model's :class:`~lightning_lowprec.nn.QuantizedLinear` layers (what the plugin
            trained it with). With a model, the layers are chosen as
            :func:`~lightning_lowprec.nn.quantize_linears` chooses them. A state dict does not
            say which tensors are Linear weights, so it needs a mapping, and the patterns
            select among its 2-D floating ``<module>.weight`` tensors by module name.
        path: the file to write (parents are created).
        include, exclude: module-name patterns, as for ``quantize_linears``.
        scale_rule: the MX block-scale rule every packed weight is quantized with
            (``"floor"`` or ``"rceil"``, see :func:`~lightning_lowprec.quantize`); ``None``
            (default): each :class:`~lightning_lowprec.nn.QuantizedLinear`'s own rule, the
            spec's ``"floor"`` for other layers and for a state dict.

    Returns:
        ``{tensor name: format name}`` of the weights that were packed.

    Raises:
        ValueError: an unknown or per-tensor (``fp8_*``) format or scale rule, a state dict
            with a single format or ``None``, ``None`` for a model without quantized layers,
            or no weight selected.
    """
    if scale_rule is not None and scale_rule not in SCALE_RULES:
        raise ValueError(
            f"Unknown scale_rule {scale_rule!r}. Valid rules: {', '.join(SCALE_RULES)}, or None "
            "(each QuantizedLinear's own rule, floor elsewhere)."
        )
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        formats = _model_weight_formats(model_or_state_dict, fmt, include, exclude)
        rules = _model_scale_rules(model_or_state_dict, formats, scale_rule)
    else:
        state = dict(model_or_state_dict)
        formats = _state_dict_weight_formats(state, fmt, include, exclude)
        rules = dict.fromkeys(formats, scale_rule or "floor")
    for name, f in formats.items():
        if f.scaling != "block":
            raise ValueError(
                f"{name}: format {f.name!r} has a per-tensor scale and cannot be packed "
                f"bit-exactly; packable formats: {', '.join(_block_formats())}."
            )
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, value in state.items():
        value = value.detach().cpu()
        entry = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        f = formats.get(name)
        if f is None:
            # safetensors refuses tensors that share memory (tied weights, views of a larger
            # buffer): those get their own copy.
            storage = value.untyped_storage()
            shared = storage.data_ptr() in seen or storage.nbytes() != value.nbytes
            seen.add(storage.data_ptr())
            tensors[name] = value.clone() if shared else value.contiguous()
            entries[name] = {"format": None, **entry}
            continue
        codes, scales = pack(value, f, rules[name])
        tensors[name + _CODES], tensors[name + _SCALES] = codes, scales
        entries[name] = {"format": f.name, "scale_rule": rules[name], **entry}
    metadata = {METADATA_KEY: json.dumps({"version": FORMAT_VERSION, "tensors": entries})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return {name: f.name for name, f in formats.items()}


def _model_scale_rules(
    model: nn.Module, formats: Mapping[str, Format], scale_rule: ScaleRule | None
) -> dict[str, ScaleRule]:
    """``{weight key: scale rule}``: ``scale_rule``, else the layer's own (floor for a plain
    Linear), so that the packed weight is the one the layer's forward multiplied."""
    rules = {}
    for key in formats:
        layer_name = key.rpartition(".")[0]
        layer = model.get_submodule(layer_name)
        own = layer.scale_rule if isinstance(layer, QuantizedLinear) else "floor"
        rules[key] = own if scale_rule is None else scale_rule
    return rules


def load_mx(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    dequantize: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor] | nn.Module:
    """Read a checkpoint written by :func:`export_mx`.

    Args:
        path: the safetensors file.
        model: where to load it; ``None`` returns the state dict instead.
        dequantize: ``True``: every packed weight becomes a plain tensor of its original dtype,
            equal bit for bit to ``quantize(W, fmt)`` (a normal state dict). ``False`` (needs
            ``model``): each packed Linear weight stays packed; its layer becomes a
            :class:`PackedLinear` that decodes the weight and quantizes its input to the same
            format in every forward, as :class:`~lightning_lowprec.nn.QuantizedLinear` did.
        device: where the tensors go.

    Returns:
        The state dict (``model=None``) or ``model``, loaded (``strict``).

    Raises:
        ValueError: not an export of this package (or of a newer one), or
            ``dequantize=False`` without a model.
    """
    if not dequantize and model is None:
        raise ValueError("load_mx(..., dequantize=False) keeps packed layers: pass the model.")
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        raw = (file.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not written by export_mx.")
        header = json.loads(raw)
        if header.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written in export format {header['version']}; this version of "
                f"lightning-lowprec reads up to {FORMAT_VERSION}."
            )
        entries = header["tensors"]
        stored = {key: file.get_tensor(key) for key in file.keys()}
    state: dict[str, Tensor] = {}
    packed: dict[str, tuple[tuple[Tensor, Tensor, Format, torch.Size, torch.dtype], str]] = {}
    for name, entry in entries.items():
        if entry["format"] is None:
            state[name] = stored[name]
            continue
        spec = (stored[name + _CODES], stored[name + _SCALES], parse(entry["format"]),
                torch.Size(entry["shape"]), getattr(torch, entry["dtype"]))
        if dequantize:
            state[name] = unpack(*spec)
        else:
            packed[name] = (spec, entry.get("scale_rule", "floor"))
    if model is None:
        return state
    for name, (spec, rule) in packed.items():
        _replace_with_packed(model, name, spec, rule, state)
    model.load_state_dict(state, strict=True)
    return model


class PackedLinear(nn.Module):
    """A Linear layer whose weight stays packed (MX codes and E8M0 scales) between forwards.

    Forward: ``quantize(x, input_fmt, scale_rule=scale_rule) @ W.T + bias`` with ``W`` decoded
    from the packed bytes (bit for bit ``quantize(W_trained, fmt, scale_rule=scale_rule)``),
    the input quantized along ``in_features`` as the training forward did. Decoding costs one
    pass over the weight per forward; the memory at rest is that of the file. For inference
    only (the packed bytes have no gradient).

    Attributes:
        codes: ``uint8`` buffer, the packed element codes.
        scales: ``uint8`` buffer ``[out_features, blocks]``, the E8M0 block scales.
        fmt: the weight's format; ``input_fmt`` that of the input (``None``: not quantized).
        scale_rule: the MX block-scale rule the input is quantized with (the weight's, which
            its packed scales already hold).
    """

    def __init__(
        self,
        codes: Tensor,
        scales: Tensor,
        fmt: Format,
        shape: torch.Size,
        dtype: torch.dtype,
        bias: Tensor | None = None,
        input_fmt: Format | None = None,
        scale_rule: ScaleRule = "floor",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.fmt, self.input_fmt, self.dtype = fmt, input_fmt, dtype
        self.scale_rule = scale_rule
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> Tensor:
        """The decoded weight (a fresh tensor of the original dtype)."""
        return unpack(self.codes, self.scales, self.fmt,
                      torch.Size((self.out_features, self.in_features)), self.dtype)

    def forward(self, input: Tensor) -> Tensor:
        if self.input_fmt is None:
            x = input
        else:
            x = quantize(input, self.input_fmt, -1, scale_rule=self.scale_rule)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        rule = "" if self.scale_rule == "floor" else f", scale_rule={self.scale_rule}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt.name}{rule}")


def pack(
    weight: Tensor, fmt: str | Format, scale_rule: ScaleRule = "floor"
) -> tuple[Tensor, Tensor]:
    """``quantize(weight, fmt, scale_rule=scale_rule)`` (blocks along the last axis) as packed
    codes and E8M0 scales.

    Returns:
        ``(codes, scales)``: ``codes`` a flat ``uint8`` tensor of ``ceil(n * bits / 8)`` bytes
        (``n`` elements, rows concatenated, padded to a whole byte group), ``scales`` a
        ``uint8`` tensor of ``weight.shape[:-1] + (blocks,)``.

    Raises:
        ValueError: a per-tensor format, an unknown scale rule, a 0-D ``weight`` or one not
            fp32, bf16 or fp16.
        RuntimeError: the codes would not decode to ``quantize(weight, fmt)`` exactly (a
            quantizer whose output is off its own format's grid).
    """
    fmt = parse(fmt)
    if fmt.scaling != "block" or weight.ndim == 0:
        raise ValueError(
            f"pack needs an MX format ({', '.join(_block_formats())}) and a tensor of at least "
            f"one dimension; got {fmt.name!r} and shape {tuple(weight.shape)}."
        )
    if scale_rule not in SCALE_RULES:
        raise ValueError(
            f"Unknown scale_rule {scale_rule!r}. Valid rules: {', '.join(SCALE_RULES)}."
        )
    if weight.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"pack expects a fp32, bf16 or fp16 weight (what quantize takes), got "
            f"{weight.dtype}. Valid dtypes: {', '.join(map(str, _INPUT_DTYPES))}."
        )
    # The quantizer's own fp32 grid values (every MX grid value is an fp32), with the scales of
    # the weight's dtype: the cast of q is quantize(weight) bit for bit.
    q = _grid_values(weight.detach(), fmt, scale_rule)
    # Each block's shared exponent as the quantizer chose it, from the source block maxima
    # (zero padding changes no maximum) and the same helper: exact for either rule.
    padded = _blocks(weight.detach().float(), fmt.block_size)
    amax = torch.maximum(padded.amax(-1, keepdim=True), -padded.amin(-1, keepdim=True))
    shared = _biased_shared_exponents(amax, fmt, scale_rule, weight.dtype) - _E8M0_BIAS
    nan = ~torch.isfinite(amax)
    elements = (_blocks(q, fmt.block_size) * _pow2(-shared)).masked_fill_(nan, 0.0)
    scales = (shared + _E8M0_BIAS).to(torch.uint8).masked_fill_(nan, _E8M0_NAN).squeeze(-1)
    length = weight.shape[-1]
    codes = _encode(elements.flatten(-2)[..., :length], fmt)
    packed = _pack_bits(codes.flatten(), fmt.bits)
    decoded = unpack(packed, scales, fmt, weight.shape, torch.float32)
    if not torch.equal(decoded.view(torch.int32), q.view(torch.int32)):
        raise RuntimeError(f"Packing to {fmt.name} is not exact: quantize returned off-grid "
                           "values.")
    return packed, scales


def unpack(
    codes: Tensor, scales: Tensor, fmt: str | Format, shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """The weight of ``shape`` and ``dtype`` that :func:`pack` packed (its inverse).

    Elements times scales in fp32 (exact: powers of two), then one cast to ``dtype``: the cast
    ``quantize`` itself ends with.
    """
    fmt = parse(fmt)
    shape = torch.Size(shape)
    values = _decode_table(fmt, codes.device)[_unpack_bits(codes, fmt.bits, shape.numel()).long()]
    values = values.view(shape)
    padded = _blocks(values, fmt.block_size)
    scales = scales.unsqueeze(-1)
    scale = scales.view(torch.float8_e8m0fnu).float()
    # NaN blocks as quantize writes them: the default NaN of ``dtype``, filled after the cast
    # (CPU's vectorised fp32 -> bf16 cast writes NaN as 0xFFFF, the scalar one as 0x7FC0).
    out = (padded * scale).to(dtype).masked_fill_(scales == _E8M0_NAN, torch.nan)
    return out.flatten(-2)[..., : shape[-1]].reshape(shape)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` with its last axis zero-padded to whole blocks and cut into ``(blocks, 32)``."""
    pad = -x.shape[-1] % block_size
    return F.pad(x, (0, pad)).unflatten(-1, (-1, block_size))


def _pow2(n: Tensor) -> Tensor:
    """Exact ``2.0**n`` (fp32) for int32 ``n`` in [-127, 127]: an E8M0 value."""
    return (n + _E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu).float()


def _magnitudes(fmt: Format) -> Tensor:
    """The format's non-negative elements, increasing; element ``j`` has the magnitude code
    ``j`` (the unsigned float code; for MXINT8 the integer ``k`` of ``k / 64``)."""
    if fmt.element == "int":
        return torch.arange(128, dtype=torch.float32) * 2.0**-fmt.mbits
    unsigned = torch.arange(2 ** (fmt.bits - 1), dtype=torch.int64)
    exponent, mantissa = unsigned >> fmt.mbits, unsigned & (2**fmt.mbits - 1)
    normal = (mantissa + 2**fmt.mbits).double() * torch.exp2(
        (exponent - fmt.bias - fmt.mbits).double())
    subnormal = mantissa.double() * 2.0 ** (fmt.emin - fmt.mbits)
    values = torch.where(exponent == 0, subnormal, normal).float()
    return values[values <= fmt.max]  # E4M3's NaN code, E5M2's inf and NaN codes


def _encode(elements: Tensor, fmt: Format) -> Tensor:
    """``uint8`` codes of fp32 element values that lie on ``fmt``'s grid."""
    magnitude = torch.searchsorted(_magnitudes(fmt).to(elements.device), elements.abs())
    negative = torch.signbit(elements)
    if fmt.element == "int":
        # Two's complement; -0.0 as the unused code -128.
        k = torch.where(negative, -magnitude, magnitude)
        k = torch.where(negative & (magnitude == 0), -128, k)
        return k.to(torch.int8).view(torch.uint8)
    return (magnitude | (negative.long() << (fmt.bits - 1))).to(torch.uint8)


def _decode_table(fmt: Format, device: torch.device) -> Tensor:
    """The fp32 value of every code of ``fmt`` (codes no element uses decode to NaN)."""
    magnitudes = _magnitudes(fmt)
    table = torch.full((2**fmt.bits,), torch.nan, dtype=torch.float32)
    j = torch.arange(len(magnitudes))
    if fmt.element == "int":
        table[j] = magnitudes
        table[(-j[1:]) & 0xFF] = -magnitudes[1:]
        table[0x80] = -0.0
    else:
        table[j] = magnitudes
        table[j | 1 << (fmt.bits - 1)] = -magnitudes
    return table.to(device)


def _pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack ``bits``-wide codes (``uint8``, flat) densely, little-endian within a group."""
    if bits == 8:
        return codes.contiguous()
    per_group = {4: 2, 6: 4}[bits]
    groups = F.pad(codes, (0, -len(codes) % per_group)).view(-1, per_group).int()
    word = sum(groups[:, i] << (bits * i) for i in range(per_group))
    group_bytes = bits * per_group // 8
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(group_bytes)], 1).to(
        torch.uint8).flatten()


def _unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` codes of :func:`_pack_bits`'s output."""
    if bits == 8:
        return packed[:count]
    per_group = {4: 2, 6: 4}[bits]
    group_bytes = bits * per_group // 8
    groups = packed.view(-1, group_bytes).int()
    word = sum(groups[:, b] << (8 * b) for b in range(group_bytes))
    mask = 2**bits - 1
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(per_group)], 1)
    return codes.flatten()[:count].to(torch.uint8)


def _model_weight_formats(
    model: nn.Module,
    fmt: str | Format | FormatMap | None,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> dict[str, Format]:
    """``{"<layer>.weight": format}`` of the model's selected Linear layers."""
    if fmt is None:
        per_layer = {
            name: m.w_fmt for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
        }
        if not per_layer:
            raise ValueError(
                f"fmt=None exports the formats of the model's QuantizedLinear layers, but "
                f"{type(model).__name__} has none: pass a format such as 'mxfp6_e2m3'."
            )
    else:
        per_layer = layer_formats(model, fmt, include=include, exclude=exclude)
    return {_weight_key(model, name): f for name, f in per_layer.items()}


def _weight_key(model: nn.Module, layer: str) -> str:
    """The state-dict key of a Linear layer's weight.

    Raises:
        ValueError: the weight is parametrized (learnable multipliers): the state dict then
            holds the factors, not the weight the forward used.
    """
    if parametrize.is_parametrized(model.get_submodule(layer), "weight"):
        raise ValueError(
            f"{layer or type(model).__name__} has a parametrized weight (e.g. learnable "
            "multipliers): merge them first (lightning_lowprec.multipliers.merge_multipliers)."
        )
    return f"{layer}.weight" if layer else "weight"


def _state_dict_weight_formats(
    state: Mapping[str, Tensor],
    fmt: str | Format | FormatMap | None,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> dict[str, Format]:
    """``{key: format}`` of the 2-D ``<module>.weight`` tensors a mapping selects."""
    if not isinstance(fmt, Mapping):
        raise ValueError(
            f"A state dict does not say which tensors are Linear weights (embeddings are 2-D "
            f"too): pass the model, or a {{pattern: format}} mapping naming them (got fmt={fmt!r})."
        )
    fmt_map = check_format_map(fmt)
    include_patterns = _check_patterns("include", include)
    exclude_patterns = _check_patterns("exclude", exclude)
    formats = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or value.ndim != 2 or not value.is_floating_point():
            continue
        if not _is_selected(module, include_patterns, exclude_patterns):
            continue
        f = _mapped_format(module, fmt_map)
        if f is not None:
            formats[key] = f
    if not formats:
        raise ValueError(
            f"The format mapping {dict(fmt)!r} selects no 2-D weight of the state dict."
        )
    return formats


def _replace_with_packed(
    model: nn.Module, key: str, spec: tuple[Tensor, Tensor, Format, torch.Size, torch.dtype],
    scale_rule: str, state: dict[str, Tensor],
) -> None:
    """Swap the Linear layer owning weight ``key`` for a :class:`PackedLinear` holding
    ``spec`` (and quantizing its input with ``scale_rule``); ``state`` gets the new layer's
    buffers."""
    layer_name, _, leaf = key.rpartition(".")
    layer = model.get_submodule(layer_name) if layer_name else None
    if leaf != "weight" or not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{key}: dequantize=False keeps Linear weights inside a model packed; this is a "
            f"{type(layer).__name__ if layer is not None else 'model-level tensor'}."
        )
    bias = None if layer.bias is None else torch.empty_like(layer.bias)  # loaded from state
    input_fmt = layer.a_fmt if isinstance(layer, QuantizedLinear) else spec[2]
    packed = PackedLinear(*spec, bias=bias, input_fmt=input_fmt, scale_rule=scale_rule)
    parent_name, _, child = layer_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, packed)
    state[f"{layer_name}.codes"], state[f"{layer_name}.scales"] = packed.codes, packed.scales


def _block_formats() -> list[str]:
    return [name for name, f in FORMATS.items() if f.scaling == "block"]
