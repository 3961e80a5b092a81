"""The MX shared-scale rule as a layer/plugin/runner setting (issue 18, item 9): ``"floor"`` (the
OCP spec, default) or ``"rceil"`` (NVIDIA's / torchao's MXFP8 rule), used by every quantize call
of a :class:`QuantizedLinear`: forward operands, the cached weight and the quantized backward."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, TokenWindows, make_gpt
from mx_reference import reference_quantize_tensor
from torch import nn

import lightning_lowprec.quantizer as quantizer
from lightning_lowprec import LowPrecision, LowPrecisionPlugin, QuantizedLinear, quantize
from lightning_lowprec.callbacks.monitor import _quantization_sums
from lightning_lowprec.export import pack, unpack
from lightning_lowprec.formats import FORMATS, parse
from lightning_lowprec.nn import quantize_linears
from lightning_lowprec.scaled_mm import quantize_operand

FMT = "mxfp8_e4m3"
RULE = "rceil"


def q(t: torch.Tensor, axis: int = -1, rule: str = RULE) -> torch.Tensor:
    return quantize(t.detach(), FMT, axis, scale_rule=rule)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


def layer_and_input(quantize_backward: bool, **kwargs):
    torch.manual_seed(0)
    layer = QuantizedLinear(72, 40, fmt=FMT, quantize_backward=quantize_backward, **kwargs)
    x = torch.randn(3, 17, 72, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("quantize_backward", [False, True], ids=["forward-only", "all-three"])
def test_rceil_layer_is_f_linear_on_rceil_operands_bitwise(quantize_backward, autocast):
    layer, x = layer_and_input(quantize_backward, scale_rule=RULE)
    assert layer.scale_rule == RULE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    cast = bf16 if autocast else (lambda t: t)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert torch.equal(y, F.linear(cast(q(x)), cast(q(w)), cast(b)))
    # The rule matters: floor operands give another output.
    assert not torch.equal(y, F.linear(cast(q(x, rule="floor")), cast(q(w, rule="floor")),
                                       cast(b)))

    r = torch.randn_like(y)
    (y * r).float().sum().backward()
    x2, r2 = x.detach().reshape(-1, 72), r.reshape(-1, 40)
    if quantize_backward:
        g_x = quantize(r2, FMT, -1, scale_rule=RULE)
        g_w = quantize(r2, FMT, 0, scale_rule=RULE)
        grad_x, grad_w = g_x @ cast(q(w, axis=0)), g_w.T @ cast(q(x2, axis=0))
        floor_x = quantize(r2, FMT, -1) @ cast(q(w, 0, "floor"))
        assert not torch.equal(x.grad, floor_x.float().reshape(x.shape))
    else:
        grad_x, grad_w = r2 @ cast(q(w)), r2.T @ cast(q(x2))
    assert torch.equal(x.grad, grad_x.float().reshape(x.shape))
    assert torch.equal(layer.weight.grad, grad_w.float())


def test_the_eval_weight_cache_keys_on_the_rule():
    layer, x = layer_and_input(False)
    x = x.detach()
    with torch.no_grad():
        floor = layer(x)
        layer.scale_rule = RULE  # the cache must not hand back the floor weight
        rceil = layer(x)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert torch.equal(floor, F.linear(q(x, rule="floor"), q(w, rule="floor"), b))
    assert torch.equal(rceil, F.linear(q(x), q(w), b))


def test_default_is_the_spec_and_repr_shows_a_change():
    assert QuantizedLinear(64, 8, fmt=FMT).scale_rule == "floor"
    assert "scale_rule" not in repr(QuantizedLinear(64, 8, fmt=FMT))
    assert "scale_rule=rceil" in repr(QuantizedLinear(64, 8, fmt=FMT, scale_rule=RULE))
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    quantize_linears(model, FMT, exclude=None, scale_rule=RULE)
    assert [m.scale_rule for m in model] == [RULE, RULE]


@pytest.mark.parametrize("bad", ["ceil", "FLOOR", "", None])
def test_unknown_scale_rule_names_the_valid_rules(bad):
    from lightning_lowprec.litgpt.options import LowPrecOptions

    for make in (
        lambda: QuantizedLinear(64, 8, fmt=FMT, scale_rule=bad),
        lambda: quantize_linears(nn.Sequential(nn.Linear(64, 8)), FMT, exclude=None,
                                 scale_rule=bad),
        lambda: LowPrecision(FMT, scale_rule=bad),
        lambda: LowPrecisionPlugin(FMT, scale_rule=bad),
    ):
        with pytest.raises(ValueError, match="Valid rules: floor, rceil") as info:
            make()
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="lowprec.scale_rule.*Valid values: 'floor', 'rceil'"):
        LowPrecOptions.from_mapping({"fmt": FMT, "scale_rule": bad})


def test_plugin_sets_it_on_every_layer_and_in_its_state():
    plugin = LowPrecision(FMT, scale_rule=RULE)
    model = plugin.convert_module(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    assert [m.scale_rule for m in model if isinstance(m, QuantizedLinear)] == [RULE, RULE]
    assert plugin.state_dict()["scale_rule"] == RULE
    assert "scale_rule='rceil'" in repr(plugin)
    assert "scale_rule" not in repr(LowPrecision(FMT))
    mapped = LowPrecision({"0": FMT, "2": "mxfp6_e2m3"}, scale_rule=RULE)
    model = mapped.convert_module(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    assert [m.scale_rule for m in model if isinstance(m, QuantizedLinear)] == [RULE, RULE]
    # A checkpoint of the other rule warns about the change.
    with pytest.warns(UserWarning, match="scale_rule: 'floor' -> 'rceil'"):
        plugin.load_state_dict(LowPrecision(FMT).state_dict())


def test_litgpt_runner_option_carries_it():
    from lightning_lowprec.litgpt.options import LowPrecOptions, resume_changes

    assert LowPrecOptions.from_mapping({"fmt": FMT}).scale_rule == "floor"
    opts = LowPrecOptions.from_mapping({"fmt": FMT, "scale_rule": RULE})
    assert opts.scale_rule == RULE
    _, warnings = resume_changes({"fmt": FMT}, opts)
    assert any("lowprec.scale_rule" in w for w in warnings), warnings


def test_fabric_trains_a_litgpt_gpt_with_rceil(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT, scale_rule=RULE)])
    gpt = make_gpt()
    model = fabric.setup(gpt)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(gpt.parameters(), lr=3e-3))
    layers = [m for m in gpt.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.scale_rule == RULE for m in layers)
    inputs, targets = TokenWindows(tokens, 4)[0]
    before = [p.detach().clone() for p in gpt.parameters()]
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(model(inputs[None]).flatten(0, 1), targets)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0]
    assert any(not torch.equal(p, b) for p, b in zip(gpt.parameters(), before, strict=True))
    # The logits are those of the rceil operands, not of the floor ones.
    batch = tokens[: 2 * SEQ_LEN].view(2, SEQ_LEN)
    with torch.no_grad():
        rceil = model(batch)
        for m in layers:
            m.scale_rule = "floor"
        floor = model(batch)
    assert not torch.equal(rceil, floor)


def test_scaled_mm_operands_honour_the_rule():
    """The ``scaled_mm`` backend's float8 operands decode to ``quantize`` under either rule."""
    torch.manual_seed(0)
    t = torch.randn(48, 96) * torch.logspace(-3, 3, 96)
    for rule in ("floor", "rceil"):
        elements, scales = quantize_operand(t, parse(FMT), "even", rule)
        decoded = (elements.float().unflatten(1, (-1, 32)) * scales.float()[..., None])
        assert torch.equal(decoded.flatten(1), quantize(t, FMT, scale_rule=rule))
    floor, _ = quantize_operand(t, parse(FMT), "even")
    assert not torch.equal(floor.float(), quantize_operand(t, parse(FMT), "even", RULE)[0].float())


def test_monitor_saturation_follows_the_rule():
    """Floor saturates the blocks whose max exceeds the element max; rceil (almost) none."""
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    floor = _quantization_sums(x, parse(FMT), "even", None, "floor")
    rceil = _quantization_sums(x, parse(FMT), "even", None, RULE)
    assert floor[2] > 0 and rceil[2] == 0
    q_rceil = quantize(x, FMT, scale_rule=RULE)
    assert rceil[1] == (x - q_rceil).square().sum()


def test_litgpt_runner_says_it_in_its_summary_line():
    from types import SimpleNamespace

    from lightning_lowprec.litgpt.options import LowPrecOptions
    from lightning_lowprec.litgpt.runner import applied

    model = nn.Sequential(nn.Linear(64, 8))
    quantize_linears(model, FMT, exclude=None, scale_rule=RULE)
    for rule, shown in (("floor", "(rounding even;"), (RULE, "(rounding even, rceil scales;")):
        opts = LowPrecOptions.from_mapping({"fmt": FMT, "scale_rule": rule, "monitor": None})
        run = SimpleNamespace(options=opts, command="finetune", config={}, fabric=None)
        assert shown in applied(run, model, [])


# The top of each dtype's range (issue 18): rceil's ceiling can take a block max in the
# dtype's top binade one scale higher, where it rounds up to 2**(top + 1) = inf.

MX_FORMATS = [name for name, f in FORMATS.items() if f.scaling == "block"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def top_blocks(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 32 whose max lies in ``dtype``'s top binade: at the dtype's max, at ``2**top``,
    around ``max * 2**(top - emax)`` (where rceil's scale steps up) and around the element
    grid's round-up point ``(2 - 2**-(mbits + 1)) * 2**top``; the rest of each block spans
    many binades below, so the scale matters to them too."""
    f, big = FORMATS[fmt], torch.finfo(dtype).max
    top = math.frexp(big)[1] - 1
    anchors = torch.tensor([big, 2.0**top, f.max / 2**f.emax * 2.0**top,
                            (2 - 2.0 ** -(f.mbits + 1)) * 2.0**top, 1.9 * 2.0**top],
                           dtype=torch.float64).to(dtype)
    anchors = torch.cat([anchors, torch.nextafter(anchors, torch.zeros_like(anchors)),
                         torch.nextafter(anchors, torch.full_like(anchors, math.inf))])
    anchors = anchors[torch.isfinite(anchors)]
    rest = (torch.linspace(-1, 1, 31, dtype=torch.float64)
            * torch.logspace(0, -12, 31, base=2, dtype=torch.float64))
    lines = [torch.cat([a.view(1).double(), (a.double() * rest)]) for a in anchors]
    return torch.stack(lines).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return a.view(ints[a.dtype]) == b.view(ints[b.dtype])


@contextlib.contextmanager
def graph_path():
    """Run the plain graph (what compile, CUDA and autograd use) eagerly on CPU."""
    with mock.patch.object(quantizer, "_in_slices", lambda x: False):
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_rceil_is_finite_at_the_top_of_the_dtype_and_matches_the_reference(fmt, dtype):
    """Every rounding mode, the slice loop and the plain graph: finite, and the reference's
    values (its scale capped at the largest with ``max * 2**s`` finite in the dtype); the
    capped blocks are floor's blocks."""
    x = top_blocks(fmt, dtype)
    # Stochastic rounding lands on the lower or upper neighbour, the reference's results for
    # the draws 1 and 0.
    lower = reference_quantize_tensor(x, fmt, -1, "stochastic", torch.ones_like(x), RULE)
    upper = reference_quantize_tensor(x, fmt, -1, "stochastic", torch.zeros_like(x), RULE)
    for path in (contextlib.nullcontext, graph_path):
        for rounding in ("even", "nearest", "stochastic"):
            with path():
                got = quantize(x, fmt, rounding=rounding, scale_rule=RULE)
            assert torch.isfinite(got).all(), (rounding, path)
            if rounding == "stochastic":
                assert (same_bits(got, lower) | same_bits(got, upper)).all(), path
            else:
                expected = reference_quantize_tensor(x, fmt, rounding=rounding, scale_rule=RULE)
                assert same_bits(got, expected).all(), (rounding, path)
    assert torch.isfinite(upper).all(), "the reference overflows"
    # The blocks whose rceil scale would overflow take floor's scale, hence floor's values.
    assert same_bits(quantize(x[:1], fmt, scale_rule=RULE), quantize(x[:1], fmt)).all()


def _top_all_formats(x32, x16b, x16):
    return [quantize(x, fmt, scale_rule=RULE) for x in (x32, x16b, x16) for fmt in MX_FORMATS]


@pytest.mark.slow
def test_compiled_rceil_is_finite_at_the_top_and_equals_eager():
    inputs = [torch.cat([top_blocks(fmt, d) for fmt in MX_FORMATS]) for d in DTYPES]
    got = torch.compile(_top_all_formats, dynamic=False)(*inputs)
    for g, e in zip(got, _top_all_formats(*inputs), strict=True):
        assert torch.isfinite(g).all()
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_of_the_range_scaled_mm_export_and_monitor_follow_the_capped_scale(dtype):
    """The ``scaled_mm`` operands decode to the finite ``quantize``; the export packs and
    unpacks it bit for bit; the monitor counts the capped block maxima as saturated."""
    for fmt in MX_FORMATS:
        x = top_blocks(fmt, dtype)
        expected = quantize(x, fmt, scale_rule=RULE)
        assert torch.isfinite(expected).all()
        if parse(fmt).torch_dtype is not None:
            elements, scales = quantize_operand(x, parse(fmt), "even", RULE)
            decoded = (elements.float().unflatten(1, (-1, 32)) * scales.float()[..., None])
            assert torch.equal(decoded.flatten(1).to(dtype), expected), fmt
        codes, scales = pack(x, fmt, RULE)
        assert torch.equal(unpack(codes, scales, fmt, x.shape, dtype), expected), fmt
        # The first line holds +-the dtype's max: beyond max * 2**(top - emax), saturated.
        f, line = FORMATS[fmt], x[:1]
        top = math.frexp(torch.finfo(dtype).max)[1] - 1
        beyond = (line.double().abs() > f.max * 2.0 ** (top - f.emax)).sum()
        assert beyond == 2
        assert _quantization_sums(line, parse(fmt), "even", None, RULE)[2] == beyond, fmt
