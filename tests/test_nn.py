"""QuantizedLinear and quantize_linears: drop-in behaviour, gradients, autocast, compile, selection.

Every gradient is checked against an independent computation with ``quantize`` on the operands;
the output gradient is a fixed random tensor ``r`` (the loss is ``(y * r).sum()``), so the hand
computations need no autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK_LINEARS, make_gpt
from torch import nn
from torch.nn.utils import parametrize

from lightning_lowprec.nn import QuantizedLinear, quantize_linears
from lightning_lowprec.quantizer import quantize

FMT = "mxfp6_e2m3"


def layer_and_input(shape, quantize_backward=False, seed=0, **formats):
    torch.manual_seed(seed)
    formats = formats or {"fmt": FMT}
    layer = QuantizedLinear(72, 40, quantize_backward=quantize_backward, **formats)
    x = torch.randn(*shape, 72, requires_grad=True)
    return layer, x


def run_backward(layer, x):
    """Forward, then backward with the output gradient ``r``; return (y, r)."""
    y = layer(x)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    return y, r


# --------------------------------------------------------------------------------------------
# Drop-in nn.Linear
# --------------------------------------------------------------------------------------------


def test_is_a_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    plain = nn.Linear(64, 32)
    layer = QuantizedLinear(64, 32, fmt=FMT)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    layer.load_state_dict(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer.weight, plain.weight)
    assert QuantizedLinear(64, 32, bias=False, fmt=FMT).bias is None


@pytest.mark.parametrize("shape", [(50,), (3, 17)], ids=["2d", "3d"])
def test_forward_multiplies_the_quantized_operands(shape):
    layer, x = layer_and_input(shape)
    expected = F.linear(quantize(x, FMT), quantize(layer.weight, FMT), layer.bias)
    assert torch.equal(layer(x), expected)
    # Quantization changes the result: the layer is not secretly a plain Linear.
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


def test_extra_repr_shows_the_formats():
    assert "fmt=mxfp6_e2m3, quantize_backward=False" in repr(QuantizedLinear(32, 32, fmt=FMT))
    layer = QuantizedLinear(
        32,
        32,
        w_fmt="mxfp4_e2m1",
        a_fmt="mxfp8_e4m3",
        g_fmt="mxfp8_e5m2",
        quantize_backward=True,
        rounding="stochastic",
    )
    assert repr(layer) == (
        "QuantizedLinear(in_features=32, out_features=32, bias=True, w_fmt=mxfp4_e2m1, "
        "a_fmt=mxfp8_e4m3, g_fmt=mxfp8_e5m2, quantize_backward=True, rounding=stochastic)"
    )


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50,), (3, 17)], ids=["2d", "3d"])
def test_forward_only_gives_the_straight_through_gradient(shape):
    """The gradients are autograd's for F.linear applied to the quantized operands."""
    layer, x = layer_and_input(shape)
    _, r = run_backward(layer, x)

    x_q = quantize(x.detach(), FMT).requires_grad_()
    w_q = quantize(layer.weight.detach(), FMT).requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    (F.linear(x_q, w_q, bias) * r).sum().backward()
    assert torch.equal(x.grad, x_q.grad)
    assert torch.equal(layer.weight.grad, w_q.grad)
    assert torch.equal(layer.bias.grad, bias.grad)
    assert layer.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(50,), (3, 17)], ids=["2d", "3d"])
@pytest.mark.parametrize(
    "formats",
    [{"fmt": FMT}, {"w_fmt": "mxfp4_e2m1", "a_fmt": "mxfp8_e4m3", "g_fmt": "mxfp8_e5m2"}],
    ids=["one-format", "three-formats"],
)
def test_quantized_backward_matches_a_hand_computation(shape, formats):
    """dW = Q_g(r).T Q_a(x) blocked along tokens; dx = Q_g(r) Q_w(W) blocked along out."""
    layer, x = layer_and_input(shape, quantize_backward=True, **formats)
    y, r = run_backward(layer, x)
    w_fmt = formats.get("w_fmt", FMT)
    a_fmt = formats.get("a_fmt", FMT)
    g_fmt = formats.get("g_fmt", FMT)

    x2, r2, w = x.detach().reshape(-1, 72), r.reshape(-1, 40), layer.weight.detach()
    # Blocks along the token axis, written as blocks along the last axis of the transposes.
    grad_w = quantize(r2.T.contiguous(), g_fmt) @ quantize(x2.T.contiguous(), a_fmt).T
    grad_x = torch.einsum("to,oi->ti", quantize(r2, g_fmt), quantize(w.T.contiguous(), w_fmt).T)

    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_x.reshape(x.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, r2.sum(0))
    # The forward is the same as in forward-only mode.
    assert torch.equal(y, F.linear(quantize(x, a_fmt), quantize(w, w_fmt), layer.bias))
    # Quantizing the backward changed the gradients relative to the straight-through ones.
    assert not torch.allclose(layer.weight.grad, r2.T @ quantize(x2, a_fmt), rtol=1e-3)


def test_no_bias_and_frozen_weight():
    torch.manual_seed(0)
    layer = QuantizedLinear(64, 32, bias=False, fmt=FMT, quantize_backward=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None


# --------------------------------------------------------------------------------------------
# bf16 autocast and torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize_backward", [False, True])
def test_bf16_autocast_quantizes_what_linear_would_see(quantize_backward):
    layer, x = layer_and_input((3, 17), quantize_backward=quantize_backward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        plain = nn.Linear(72, 40)(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    b16 = [t.detach().to(torch.bfloat16) for t in (x, layer.weight, layer.bias)]
    expected = F.linear(quantize(b16[0], FMT), quantize(b16[1], FMT), b16[2])
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert layer.bias.grad.abs().sum() > 0


@pytest.mark.slow  # ~20 s: Inductor compiles a forward and a backward graph
def test_compiled_equals_eager():
    """One compiled model holding a layer of each backward mode (compiling is slow here)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantizedLinear(64, 96, fmt=FMT),
        nn.GELU(),
        QuantizedLinear(96, 32, fmt="mxfp8_e4m3", quantize_backward=True),
    )
    x = torch.randn(4, 40, 64, requires_grad=True)

    def grads(module):
        x.grad = None
        model.zero_grad()
        y = module(x)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in model.parameters())]

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~15 s: one Inductor forward graph
def test_compiled_bf16_autocast_with_a_ragged_in_features_is_finite():
    """Issue 18: in_features 72 leaves a short last block, which Inductor once filled with NaN."""
    layer, x = layer_and_input((3, 17))
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, dynamic=False)(x)
    assert compiled.isfinite().all()
    # Not bitwise: Inductor elides the fp32 -> bf16 -> fp32 round trip of the autocast cast
    # (emulate_precision_casts is off), so the compiled layer quantizes the fp32 values.
    assert (compiled - eager).abs().max() < 0.1 * eager.abs().max()


@pytest.mark.slow  # ~15 s: Inductor compiles a dynamic forward and backward graph
def test_compiled_dynamic_shapes_equals_eager():
    """Issue 18: dynamic=True crashed Dynamo on the forward-only layer (symbolic format fields)."""
    torch.manual_seed(0)
    layer = QuantizedLinear(64, 32, fmt=FMT)
    compiled = torch.compile(layer, dynamic=True)
    for tokens in (5, 9):
        x = torch.randn(tokens, 64, requires_grad=True)
        y = compiled(x)
        (g_compiled,) = torch.autograd.grad(y.sum(), x)
        expected = layer(x)
        (g_eager,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# quantize_linears: in-place conversion and the pattern rule
# --------------------------------------------------------------------------------------------


def quantized_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def test_converts_in_place_keeping_the_parameters():
    gpt = make_gpt()
    params = dict(gpt.named_parameters())
    state = copy.deepcopy(gpt.state_dict())
    modules = dict(gpt.named_modules())

    assert quantize_linears(gpt, FMT) == BLOCK_LINEARS
    assert quantized_names(gpt) == BLOCK_LINEARS
    assert type(gpt.lm_head) is nn.Linear
    assert type(gpt.transformer.wte) is nn.Embedding
    assert dict(gpt.named_modules()) == modules  # the very same module objects
    assert all(p is params[name] for name, p in gpt.named_parameters())
    assert gpt.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in gpt.state_dict().items())


def test_patterns_match_names_or_containing_modules():
    def selected(**kwargs):
        return quantize_linears(make_gpt(), FMT, **kwargs)

    assert selected(include="attn") == [n for n in BLOCK_LINEARS if ".attn." in n]
    assert selected(include="transformer.h.1") == BLOCK_LINEARS[4:]
    assert selected(include=["*.proj"]) == [n for n in BLOCK_LINEARS if n.endswith("proj")]
    assert selected(include="mlp.fc", exclude=["h.0"]) == ["transformer.h.1.mlp.fc"]
    assert "lm_head" in selected(exclude=None)
    # A wrapper's attribute name in front changes nothing: "lm_head" matches "gpt.lm_head".
    wrapper = nn.ModuleDict({"gpt": make_gpt()})
    assert quantize_linears(wrapper, FMT) == [f"gpt.{n}" for n in BLOCK_LINEARS]


def test_pattern_matching_nothing_warns_and_nothing_selected_raises():
    with pytest.warns(UserWarning, match="'mlp.gate' matches no Linear layer"):
        quantize_linears(make_gpt(), FMT, exclude=["lm_head", "mlp.gate"])
    with pytest.raises(ValueError, match="No Linear layer of GPT is selected.*lm_head"):
        quantize_linears(make_gpt(), FMT, include="lm_head", exclude="*")
    with pytest.raises(ValueError, match="No Linear layer of Embedding.*Linear layers: none"):
        quantize_linears(nn.Embedding(10, 4), FMT)


def test_reconversion_reconfigures_and_other_linear_subclasses_are_left_alone():
    class CustomLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(32, 32), CustomLinear(32, 32))
    assert quantize_linears(model, FMT) == ["0"]
    assert quantize_linears(model, "mxfp4_e2m1", quantize_backward=True) == ["0"]
    assert model[0].w_fmt.name == "mxfp4_e2m1" and model[0].quantize_backward
    assert type(model[1]) is CustomLinear
    root = nn.Linear(32, 8)
    assert quantize_linears(root, FMT) == [""] and isinstance(root, QuantizedLinear)


class Scale(nn.Module):
    """A parametrization: the effective weight is twice the stored one."""

    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("parametrize_first", [True, False])
def test_parametrized_linear_quantizes_the_effective_weight(parametrize_first):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    if parametrize_first:
        parametrize.register_parametrization(model[0], "weight", Scale())
    assert quantize_linears(model, FMT) == ["0"]
    if not parametrize_first:
        parametrize.register_parametrization(model[0], "weight", Scale())
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and parametrize.is_parametrized(layer)
    stored = layer.parametrizations.weight.original
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), F.linear(quantize(x, FMT), quantize(2 * stored, FMT), layer.bias))
    assert list(layer.state_dict()) == ["bias", "parametrizations.weight.original"]

    effective = 2 * stored.detach()
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is QuantizedLinear and torch.equal(layer.weight, effective)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "mxfp5"}, "Unknown number format 'mxfp5'. Valid formats: mxfp8_e4m3"),
        ({}, "No number format given"),
        ({"w_fmt": FMT}, "No number format given"),
        ({"fmt": FMT, "g_fmt": FMT}, "g_fmt='mxfp6_e2m3' only applies with quantize_backward"),
        ({"fmt": FMT, "rounding": "up"}, "Unknown rounding 'up'. Valid modes: even, nearest"),
        ({"fmt": FMT, "quantize_backward": "yes"}, "quantize_backward must be True or False"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizedLinear(32, 32, **kwargs)
    with pytest.raises(ValueError, match=message):
        quantize_linears(nn.Linear(32, 32), **kwargs)


def test_bad_pattern_raises():
    with pytest.raises(ValueError, match="include must be module-name patterns"):
        quantize_linears(nn.Linear(32, 32), FMT, include=[3])
