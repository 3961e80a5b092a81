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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from lightning_lowprec import LMD
from lightning_lowprec import nn as nn_module
from lightning_lowprec.formats import FORMATS
from lightning_lowprec.nn import QuantizedLinear, quantize_linears
from lightning_lowprec.quantizer import quantize

FMT = "mxfp6_e2m3"
MX_FORMATS = [name for name, f in FORMATS.items() if f.scaling == "block"]


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


def saved_storages(fn):
    """Run ``fn()``; return the storages (by data pointer: bytes) autograd saved meanwhile."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_forward_only_keeps_no_copy_of_the_weight(autocast):
    """Issue 18: the backward keeps Q(x) and the weight itself, not a quantized weight copy."""
    layer, x = layer_and_input((3, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, saved = saved_storages(lambda: layer(x))
    weight = layer.weight.untyped_storage()
    others = {ptr: n for ptr, n in saved.items() if ptr != weight.data_ptr()}
    # Q(x) in the working dtype, as F.linear would keep x: quantize's own output, no larger
    # than x (its eager CPU path writes the ragged last block in place, no padded buffer).
    assert list(others.values()) == [x.numel() * (2 if autocast else 4)]
    assert weight.data_ptr() in saved
    r = torch.randn_like(y)
    (y * r).float().sum().backward()
    x_q = quantize(x.detach(), FMT)
    w_q = quantize(layer.weight.detach(), FMT)
    if autocast:
        x_q, w_q = bf16(x_q), bf16(w_q)
    assert torch.equal(x.grad, (r @ w_q).float())
    assert torch.equal(layer.weight.grad, (r.reshape(-1, 40).T @ x_q.reshape(-1, 72)).float())


def test_forward_only_stochastic_gradient_uses_the_forward_draw():
    """Stochastic rounding keeps Q(W): quantizing again would draw another weight."""
    layer, x = layer_and_input((3, 17), rounding="stochastic", fmt="mxfp4_e2m1")
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)  # the forward draws for x, then for the weight
    x_q = quantize(x.detach(), "mxfp4_e2m1", rounding="stochastic")
    w_q = quantize(layer.weight.detach(), "mxfp4_e2m1", rounding="stochastic")
    assert torch.equal(y, F.linear(x_q, w_q, layer.bias))
    r = torch.randn_like(y)
    (y * r).sum().backward()
    assert torch.equal(x.grad, r @ w_q)


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


def bf16(t):
    return t.detach().to(torch.bfloat16)


@pytest.mark.parametrize("quantize_backward", [False, True], ids=["forward-only", "all-three"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bf16_autocast_quantizes_the_fp32_operands_then_casts(fmt, quantize_backward):
    """Issue 18: autocast casts to bf16 after quantizing; casting first rounded twice."""
    layer, x = layer_and_input((3, 17), quantize_backward=quantize_backward, fmt=fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        plain = nn.Linear(72, 40)(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    w = layer.weight.detach()
    expected = F.linear(bf16(quantize(x, fmt)), bf16(quantize(w, fmt)), bf16(layer.bias))
    assert torch.equal(y, expected)
    # What casting first gives differs (the weight alone differs on 0.7-13% of its elements).
    assert not torch.equal(quantize(bf16(w), fmt), bf16(quantize(w, fmt)))

    r = torch.randn_like(y)
    (y * r).float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    x2, r2 = x.detach().reshape(-1, 72), r.reshape(-1, 40)
    if quantize_backward:
        grad_x = quantize(r2, fmt) @ bf16(quantize(w, fmt, axis=0))
        grad_w = quantize(r2, fmt, axis=0).T @ bf16(quantize(x2, fmt, axis=0))
    else:
        grad_x, grad_w = r2 @ bf16(quantize(w, fmt)), r2.T @ bf16(quantize(x2, fmt))
    assert torch.equal(x.grad, grad_x.float().reshape(x.shape))
    assert torch.equal(layer.weight.grad, grad_w.float())
    assert torch.equal(layer.bias.grad, r2.sum(0).float())


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(MX_FORMATS),
    st.floats(-100, 100),
    st.integers(0, 2**31 - 1),
)
def test_an_mx_quantized_fp32_tensor_is_a_bf16_tensor(fmt, log2_scale, seed):
    """Why casting after quantizing is exact: every MX value of a normal-range block fits bf16."""
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(seed)) * 2.0**log2_scale
    q = quantize(x, fmt)
    assert torch.equal(q.to(torch.bfloat16).float(), q)


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


class Parallel(nn.Module):
    """The layers side by side on one input, their outputs concatenated."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers], -1)


@pytest.mark.slow  # ~60 s each: Inductor compiles a forward and a backward graph
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_bf16_autocast_equals_eager_bitwise(dynamic):
    """Issue 18: compiled == eager to the bit under bf16 autocast, forward and gradients.

    in_features 72 and 51 tokens leave short last blocks (along in_features, and along the
    tokens in the backward), which Inductor once filled with NaN. And the two differed while
    eager quantized the bf16-cast operands: Inductor elides the fp32 -> bf16 -> fp32 round
    trip of a cast (emulate_precision_casts is off), so compiled code quantized the fp32
    values, as both do now. (The same elision makes a layer whose input is computed in bf16
    inside the graph, after a GELU say, differ from eager: that is Inductor's, for any op.)
    """
    torch.manual_seed(0)
    forward_only = QuantizedLinear(72, 40, fmt=FMT)
    all_three = QuantizedLinear(72, 24, fmt="mxint8", quantize_backward=True)
    model = Parallel(forward_only, all_three)
    x = torch.randn(3, 17, 72, requires_grad=True)
    r = torch.randn(3, 17, 64)

    def outputs(module):
        x.grad = None
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        (y.float() * r).sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in model.parameters())]

    eager = outputs(model)
    compiled = outputs(torch.compile(model, dynamic=dynamic))
    assert compiled[0].isfinite().all()
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(c, e)


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
# The quantized-weight cache
# --------------------------------------------------------------------------------------------


@pytest.fixture
def weight_quantizes(monkeypatch):
    """Count the ``quantize`` calls of ``nn.py`` on a weight (its storage): ``calls(layer)``."""
    real, seen = nn_module.quantize, []

    def counting(t, *args, **kwargs):
        seen.append(t.untyped_storage().data_ptr())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(nn_module, "quantize", counting)

    def calls(layer):
        n = seen.count(layer.weight.untyped_storage().data_ptr())
        seen.clear()
        return n

    return calls


def reference(layer, x):
    return F.linear(quantize(x, FMT), quantize(layer.weight.detach(), FMT), layer.bias)


def test_eval_forwards_quantize_the_weight_once_until_it_changes(weight_quantizes):
    """Issue 18: the quantized weight is cached while the weight is unchanged."""
    layer, x = layer_and_input((3, 17))
    x = x.detach()
    with torch.no_grad():
        for expected_calls in (1, 0, 0):
            assert torch.equal(layer(x), reference(layer, x))
            assert weight_quantizes(layer) == expected_calls
        layer.weight.mul_(1.5)  # any in-place update, an optimizer step say
        assert torch.equal(layer(x), reference(layer, x))
        assert weight_quantizes(layer) == 1
        layer.load_state_dict(QuantizedLinear(72, 40, fmt=FMT).state_dict())
        assert torch.equal(layer(x), reference(layer, x))
        assert weight_quantizes(layer) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another dtype: another value
            expected = F.linear(bf16(quantize(x, FMT)), bf16(quantize(layer.weight, FMT)),
                                bf16(layer.bias))
            assert torch.equal(layer(x), expected)
            assert torch.equal(layer(x), expected)
        assert weight_quantizes(layer) == 1
    with torch.inference_mode():
        assert torch.equal(layer(x), reference(layer, x))
    layer(x).sum().backward()  # no inference tensor met the autograd graph
    assert layer.weight.grad is not None


def test_training_forwards_keep_no_cache_and_frozen_weights_use_it(weight_quantizes):
    """A trainable weight is quantized in each forward (and again in the backward): a cache
    would hold the weight-sized copy that the backward no longer keeps. A frozen one is not."""
    layer, x = layer_and_input((3, 17))
    with torch.no_grad():
        layer(x)
    assert weight_quantizes(layer) == 1
    for _ in range(2):
        run_backward(layer, x)
        assert weight_quantizes(layer) == 2
    assert layer._weight_cache is None  # the training forward dropped the eval entry
    layer.weight.requires_grad_(False)
    for expected_calls in (1, 0):
        x.grad = None
        y, r = run_backward(layer, x)
        assert weight_quantizes(layer) == expected_calls
        assert torch.equal(y, reference(layer, x))
        assert torch.equal(x.grad, r @ quantize(layer.weight, FMT))


def test_the_cache_follows_the_posterior_sample(weight_quantizes):
    """Issue 18: LMD's sample_/restore_ write into the weight, which invalidates the cache."""
    layer, x = layer_and_input((3, 17))
    x = x.detach()
    optimizer = LMD(layer.parameters(), seed=0)
    run_backward(layer, x)
    optimizer.step()
    with torch.no_grad():
        at_rest = layer(x)
        assert torch.equal(at_rest, reference(layer, x))
        optimizer.sample_()
        assert torch.equal(layer(x), reference(layer, x))
        assert not torch.equal(layer(x), at_rest)
        optimizer.restore_()
        assert torch.equal(layer(x), at_rest)


def test_no_cache_for_fsdp_parametrized_or_stochastic_weights(weight_quantizes):
    """FSDP2 all-gathers into the same storage without bumping the version; a parametrized
    weight is a new tensor each forward; stochastic rounding draws anew each forward."""
    layer, x = layer_and_input((3, 17))
    layer._is_fsdp_managed_module = True  # what fully_shard sets on the modules it manages
    scaled, _ = layer_and_input((3, 17))
    parametrize.register_parametrization(scaled, "weight", Scale())
    stochastic, _ = layer_and_input((3, 17), fmt=FMT, rounding="stochastic")
    with torch.no_grad():
        for module in (layer, scaled, stochastic):
            module(x)
            module(x)
            assert module._weight_cache is None
    assert weight_quantizes(layer) == 2


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
