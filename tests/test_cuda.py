"""The CUDA paths, for a machine with a GPU (``pytest -m cuda``; ``benchmarks/gpu.py`` runs them).

Skipped without CUDA (see ``conftest.py``), so CI never depends on a GPU. Each test compares
the GPU with what the CPU suite has already checked: the quantizer bit for bit against the CPU
quantizer (itself checked against the spec), the optimizers' Triton kernels against their eager
steps, the ``scaled_mm`` backend against the emulation within the bound of
:mod:`lightning_lowprec.scaled_mm`, and the plugin training a GPT.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_gpt
from test_scaled_mm import SPECIALS, bound, same, within

from lightning_lowprec import FORMATS, LMD, LowPrecision, Madam, MPlusAdam, QuantizedLinear
from lightning_lowprec import quantize as quantize_fn
from lightning_lowprec.formats import parse
from lightning_lowprec.optim import param_groups
from lightning_lowprec.scaled_mm import quantize_operand, use_scaled_mm

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def probe(rows: int = 64, width: int = 200) -> torch.Tensor:
    """Normal values over 40 binades, with every special value and whole NaN/inf rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen) * 2.0 ** torch.randint(-20, 20, (rows, 1),
                                                                     generator=gen)
    x[0, : len(SPECIALS)] = torch.tensor(SPECIALS)
    x[1, 5], x[2, 7], x[3, 70] = torch.nan, torch.inf, -torch.inf
    return x


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["even", "nearest"])
def test_quantize_on_cuda_is_bitwise_the_cpu_quantizer(fmt, dtype, rounding):
    x = probe().to(dtype)
    for axis in (-1, 0):
        expected = quantize_fn(x, fmt, axis, rounding)
        assert same(quantize_fn(x.to(CUDA), fmt, axis, rounding).cpu(), expected)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp8_e5m2"])
def test_float8_operands_on_cuda_equal_the_cpu_ones(fmt):
    x = torch.cat([probe()[:1], probe()[4:]])  # no NaN: its float8 payload may differ
    (el_c, sc_c), (el_g, sc_g) = (quantize_operand(t, parse(fmt), "even") for t in (x, x.to(CUDA)))
    assert torch.equal(el_c.view(torch.uint8), el_g.cpu().view(torch.uint8))
    assert torch.equal(sc_c.reshape(-1).view(torch.uint8), sc_g.cpu().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("optimizer", [LMD, MPlusAdam, Madam])
def test_compiled_optimizer_kernels_equal_eager_on_cuda(optimizer):
    """Triton builds of the ``compiled`` steps (tensors above COMPILED_MIN_NUMEL) against
    the eager single-tensor steps, from the same state and gradients."""
    shapes = [(300, 260), (512,), (40, 24)]
    results = []
    for mode in ({"foreach": False}, {"compiled": True}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=CUDA) * 0.1) for s in shapes]
        opt = optimizer(params, **mode, **({} if optimizer is Madam else {"seed": 2}))
        gen = torch.Generator(CUDA).manual_seed(0)
        for _ in range(4):
            if hasattr(opt, "sample_"):
                opt.sample_()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device=CUDA)
            opt.step()
            if hasattr(opt, "restore_"):
                opt.restore_()
        results.append([p.detach().clone() for p in params])
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_on_cuda_equals_emulation_within_the_bound(fmt, dtype):
    f = parse(fmt)
    supported = use_scaled_mm("auto", CUDA, f, f, None)
    torch.manual_seed(0)
    layer = QuantizedLinear(200, 72, bias=False, fmt=fmt, backend="scaled_mm", device=CUDA,
                            dtype=dtype)
    x = torch.randn(96, 200, device=CUDA, dtype=dtype)
    if not supported:
        with pytest.raises(ValueError, match="Valid backends here"):
            layer(x)
        return
    qx, qw = quantize_fn(x, fmt).cpu(), quantize_fn(layer.weight.detach(), fmt).cpu()
    expected = (qx.double() @ qw.double().T)
    slack = 2.0**-8 * expected.abs() if dtype == torch.bfloat16 else 0
    within(layer(x).detach().cpu(), expected, bound(qx, qw, dtype) + slack)


def test_auto_picks_scaled_mm_for_fp8_on_sm89_and_compiles_without_breaks(monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = QuantizedLinear(256, 128, fmt="fp8_e4m3", device=CUDA)
    x = torch.randn(64, 256, device=CUDA)
    layer(x)
    assert bool(calls) is (capability() >= (8, 9))
    monkeypatch.undo()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize(("fmt", "optimizer"), [("fp8_e4m3", "adamw"), ("mxfp6_e2m3", "lmd")])
def test_plugin_trains_a_gpt_on_cuda(fmt, optimizer):
    fabric = L.Fabric(accelerator="cuda", devices=1,
                      plugins=[LowPrecision(fmt, autocast="bf16", device="cuda")])
    gpt = make_gpt()
    opt = (torch.optim.AdamW(gpt.parameters(), lr=3e-3) if optimizer == "adamw"
           else LMD(param_groups(gpt), seed=0))
    model, opt = fabric.setup(gpt, opt)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (8, 65), generator=gen).to(fabric.device)  # one batch, memorised
    losses = []
    for _ in range(30):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses
