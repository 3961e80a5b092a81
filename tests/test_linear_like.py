"""Layers that multiply like nn.Linear without being one, under the plugin (linear_like.py).

transformers is not a dependency (and not installed here): ``Conv1D`` below is a stand-in
with Hugging Face's ``transformers.pytorch_utils.Conv1D`` constructor, parameters and forward
copied as they are, and its class placed in that module's name, which is all the plugin looks
at (it never imports transformers).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_lowprec import LowPrecision, QuantizedLinear
from lightning_lowprec.linear_like import QuantizedConv1D

FMT = "mxfp6_e2m3"


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D (GPT-2's projections): weight ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


Conv1D.__module__ = "transformers.pytorch_utils"


class GPT2MLP(nn.Module):
    """GPT-2's MLP and an LM head: every projection a Conv1D, the head (excluded) a Linear."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.lm_head = nn.Linear(d, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.c_proj(torch.nn.functional.gelu(self.c_fc(x))))


def reference_linear(layer: Conv1D) -> QuantizedLinear:
    """The QuantizedLinear a Conv1D is: weight transposed to the Linear layout."""
    ref = QuantizedLinear(layer.nx, layer.nf, fmt=FMT)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.t())
        ref.bias.copy_(layer.bias)
    return ref


def test_hf_conv1d_is_quantized_as_the_linear_it_is():
    torch.manual_seed(0)
    model = GPT2MLP()
    keys = list(model.state_dict())
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    fabric.setup(model)  # no "no Linear selected": the Conv1Ds are
    layer = model.c_fc
    assert isinstance(layer, QuantizedConv1D) and isinstance(layer, Conv1D)
    assert not isinstance(model.lm_head, QuantizedLinear)
    assert list(model.state_dict()) == keys
    assert "fmt=mxfp6_e2m3" in repr(layer)

    ref = reference_linear(layer)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = layer(x), ref(x_ref)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, Conv1D.forward(layer, x), atol=1e-4)  # it is quantized
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad.t())
    # The input gradient multiplies by the weight in Conv1D's transposed memory layout: the
    # same products, summed in an order that depends on the layout and the thread count.
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


class Attention(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_weights_left_unquantized_are_named():
    model = Attention()
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    with pytest.warns(UserWarning, match=r"stay unquantized: attn\.in_proj_weight, "
                                         r"attn\.out_proj\.weight\. Only exact nn\.Linear"):
        fabric.setup(model)
    assert isinstance(model.proj, QuantizedLinear)


def test_excluded_layers_are_not_warned_about(recwarn):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT, exclude="attn")])
    fabric.setup(Attention())
    assert not [w for w in recwarn if "stay unquantized" in str(w.message)]


def test_transformer_encoder_layer_eval_fast_path_does_not_bypass_quantization():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(32, 32), layer)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    with pytest.warns(UserWarning, match="in_proj_weight"):
        wrapped = fabric.setup(model)
    assert isinstance(layer.linear1, QuantizedLinear)
    x = torch.randn(2, 7, 32)
    wrapped.eval()
    with torch.no_grad():
        validation = wrapped(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            quantized = wrapped(x)  # PyTorch's own slow path: through every module's forward
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(validation, quantized, rtol=1e-5, atol=1e-6)
