"""Separate rounding for the forward operands and the output gradient (issue 18, item 9):
``rounding`` for ``x`` and ``W``, ``grad_rounding`` for ``g`` under ``quantize_backward``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowprec import LowPrecision, QuantizedLinear, quantize, quantize_linears

FMT = "mxfp6_e2m3"


def layer(**kwargs) -> QuantizedLinear:
    torch.manual_seed(0)
    return QuantizedLinear(64, 48, fmt=FMT, quantize_backward=True, **kwargs)


def grads(lin: QuantizedLinear, x: torch.Tensor, g: torch.Tensor, seed: int):
    x = x.clone().requires_grad_(True)
    lin.zero_grad()
    y = lin(x)
    torch.manual_seed(seed)
    y.backward(g)
    return y.detach(), x.grad, lin.weight.grad.clone()


def test_even_forward_stochastic_gradient_is_what_the_backward_computes():
    lin = layer(rounding="even", grad_rounding="stochastic")
    assert (lin.rounding, lin.grad_rounding) == ("even", "stochastic")
    x, g = torch.randn(2, 40, 64), torch.randn(2, 40, 48)
    y, grad_x, grad_w = grads(lin, x, g, seed=3)
    w = lin.weight.detach()
    assert torch.equal(y, quantize(x, FMT) @ quantize(w, FMT).T + lin.bias.detach())
    # The backward's draws, in its order: g for dx, then g blocked along the tokens for dW.
    torch.manual_seed(3)
    g_x = quantize(g, FMT, -1, "stochastic")
    tokens_g = quantize(g.reshape(-1, 48), FMT, 0, "stochastic")
    assert torch.equal(grad_x, g_x @ quantize(w, FMT, 0, "even"))
    assert torch.equal(grad_w, tokens_g.T @ quantize(x.reshape(-1, 64), FMT, 0, "even"))
    # Stochastic: another seed, another gradient; the even forward does not change.
    y2, grad_x2, _ = grads(lin, x, g, seed=4)
    assert torch.equal(y2, y) and not torch.equal(grad_x2, grad_x)
    # And the gradient really differs from an all-even layer's.
    _, grad_x_even, _ = grads(layer(rounding="even"), x, g, seed=3)
    assert not torch.equal(grad_x_even, grad_x)


def test_grad_rounding_defaults_to_rounding():
    assert layer(rounding="stochastic").grad_rounding == "stochastic"
    assert layer().grad_rounding == "even"
    assert "grad_rounding=stochastic" in repr(layer(grad_rounding="stochastic"))
    assert "grad_rounding" not in repr(layer(rounding="nearest"))


@pytest.mark.parametrize("bad", ["floor", "EVEN", ""])
def test_unknown_grad_rounding_names_the_valid_modes(bad):
    for make in (
        lambda: layer(grad_rounding=bad),
        lambda: quantize_linears(nn.Sequential(nn.Linear(64, 8)), FMT, quantize_backward=True,
                                 exclude=None, grad_rounding=bad),
        lambda: LowPrecision(FMT, quantize_backward=True, grad_rounding=bad),
    ):
        with pytest.raises(ValueError, match="even, nearest, stochastic") as info:
            make()
        assert repr(bad) in str(info.value)


def test_grad_rounding_needs_quantize_backward():
    with pytest.raises(ValueError, match="quantize_backward=True"):
        QuantizedLinear(64, 8, fmt=FMT, grad_rounding="stochastic")
    with pytest.raises(ValueError, match="quantize_backward=True"):
        LowPrecision(FMT, grad_rounding="stochastic")


def test_plugin_sets_it_on_every_layer_and_in_its_state():
    plugin = LowPrecision(FMT, quantize_backward=True, grad_rounding="stochastic")
    model = plugin.convert_module(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2
    assert all((m.rounding, m.grad_rounding) == ("even", "stochastic") for m in layers)
    assert plugin.state_dict()["grad_rounding"] == "stochastic"
    assert "grad_rounding='stochastic'" in repr(plugin)
    assert "grad_rounding" not in repr(LowPrecision(FMT, quantize_backward=True))
    # The old argument alone still rounds everything its way.
    old = LowPrecision(FMT, quantize_backward=True, rounding="stochastic")
    model = old.convert_module(nn.Sequential(nn.Linear(64, 8)))
    assert model[0].grad_rounding == "stochastic"


def test_litgpt_runner_options_validate_and_carry_it():
    from lightning_lowprec.litgpt.options import LowPrecOptions

    opts = LowPrecOptions.from_mapping(
        {"fmt": FMT, "quantize_backward": True, "grad_rounding": "stochastic"}
    )
    assert opts.grad_rounding == "stochastic"
    assert LowPrecOptions.from_mapping({"fmt": FMT}).grad_rounding is None
    with pytest.raises(ValueError, match="null, 'even', 'nearest', 'stochastic'"):
        LowPrecOptions.from_mapping({"fmt": FMT, "quantize_backward": True,
                                     "grad_rounding": "up"})
    with pytest.raises(ValueError, match="quantize_backward: true"):
        LowPrecOptions.from_mapping({"fmt": FMT, "grad_rounding": "stochastic"})
