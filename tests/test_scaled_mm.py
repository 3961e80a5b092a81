"""The ``scaled_mm`` backend on CPU: float8 operands equal ``quantize``'s, outputs and gradients
equal the emulated backend's within the stated bound, ``auto``'s choice per device, the errors,
a training run through the plugin, and torch.compile without graph breaks.

``torch._scaled_mm`` with per-tensor scales runs on CPU; block-scaled MX matmuls do not, so for
MXFP8 the operands, their scales and the swizzled scale layout are checked here and the matmul
itself in ``test_cuda.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import GPTModule, trainer_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lowprec import LowPrecision, LowPrecisionPlugin, QuantizedLinear, quantize
from lightning_lowprec.formats import parse
from lightning_lowprec.nn import quantize_linears
from lightning_lowprec.quantizer import _tensor_amax_floor
from lightning_lowprec.scaled_mm import _swizzle, quantize_operand, scaled_mm_linear, use_scaled_mm

TENSORWISE = ["fp8_e4m3", "fp8_e5m2"]
BLOCKWISE = ["mxfp8_e4m3", "mxfp8_e5m2"]
U = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: U, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

SPECIALS = [0.0, -0.0, 1.0, -3.5, 448.0, 500.0, 57344.0, 6e4, 1e-30, 2.0**-149, 2.0**-130,
            1e30, -1e38]
values = st.one_of(
    st.sampled_from(SPECIALS),
    st.floats(-1e4, 1e4, width=32),
    st.floats(-2.0**-10, 2.0**-10, width=32),
)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns up to NaN payloads (signed zeros must match)."""
    a, b = a.float(), b.float()
    nan = torch.isnan(a) & torch.isnan(b)
    equal = (a == b) & (torch.signbit(a) == torch.signbit(b))
    return bool((equal | nan).all())


def decoded(t: torch.Tensor, fmt_name: str, rounding: str = "even") -> torch.Tensor:
    """``quantize_operand``'s elements turned back into ``quantize``'s values, exactly as
    ``quantize`` divides by its scale (per-tensor) or multiplies by the E8M0 scale (MX)."""
    fmt = parse(fmt_name)
    elements, scales = quantize_operand(t, fmt, rounding)
    assert elements.dtype == fmt.torch_dtype and elements.shape[1] % 16 == 0
    if fmt.scaling == "tensor":
        amax = torch.maximum(t.amax(), -t.amin()).float()
        encode = torch.full_like(amax, fmt.max) / amax.clamp(min=_tensor_amax_floor(fmt))
        if torch.isfinite(amax):
            assert scales == amax.clamp(min=_tensor_amax_floor(fmt)) / fmt.max
        out = elements.float() / encode
    else:
        assert scales.dtype == torch.float8_e8m0fnu and scales.shape[1] * 32 == elements.shape[1]
        out = (elements.float().unflatten(1, (-1, 32)) * scales.float()[..., None]).flatten(1)
    return out[:, : t.shape[1]].to(t.dtype)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(values, min_size=1, max_size=150),
    width=st.integers(1, 75),
    fmt=st.sampled_from(TENSORWISE + BLOCKWISE),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    rounding=st.sampled_from(["even", "nearest"]),
)
def test_float8_operands_are_quantize_values(data, width, fmt, dtype, rounding):
    rows = -(-len(data) // width)
    t = torch.tensor(data + [0.0] * (rows * width - len(data))).reshape(rows, width).to(dtype)
    assert same(decoded(t, fmt, rounding), quantize(t, fmt, -1, rounding))


@pytest.mark.parametrize("fmt", TENSORWISE + BLOCKWISE)
def test_float8_operands_of_nan_inf_and_zero_tensors(fmt):
    t = torch.randn(4, 64)
    for bad in (torch.nan, torch.inf, -torch.inf):
        u = t.clone()
        u[1, 3] = bad
        assert same(decoded(u, fmt), quantize(u, fmt))
        if fmt in TENSORWISE:
            assert decoded(u, fmt).isnan().all()
        else:  # only the affected block
            assert decoded(u, fmt).isnan().sum() == 32
    assert same(decoded(torch.zeros(3, 40), fmt), torch.zeros(3, 40))


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (128, 4), (130, 9), (300, 64)])
def test_swizzled_block_scales_match_torchao(shape):
    to_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils").to_blocked
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 255, shape, dtype=torch.uint8, generator=gen)
    scales = raw.view(torch.float8_e8m0fnu)
    assert torch.equal(_swizzle(scales).view(torch.uint8), to_blocked(raw))


def bound(qa: torch.Tensor, qb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The module docstring's bound for ``qa @ qb.T`` (2-D, fp64 sums of |products|)."""
    k = qa.shape[-1]
    return (4 * UNIT_ROUNDOFF[dtype] + (2 * k + 8) * U) * (qa.double().abs() @ qb.double().abs().T)


def within(actual: torch.Tensor, expected: torch.Tensor, limit: torch.Tensor) -> None:
    error = (actual.double() - expected.double()).abs()
    worst = (error - limit).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst}; max error {error.max().item()}"


def pair(fmt: str, dtype: torch.dtype, **kwargs) -> tuple[QuantizedLinear, QuantizedLinear]:
    torch.manual_seed(0)
    emulated = QuantizedLinear(72, 40, fmt=fmt, dtype=dtype, backend="emulated", **kwargs)
    scaled = QuantizedLinear(72, 40, fmt=fmt, dtype=dtype, backend="scaled_mm", **kwargs)
    scaled.load_state_dict(emulated.state_dict())
    return emulated, scaled


@pytest.mark.parametrize("fmt", TENSORWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize_backward", [False, True])
def test_scaled_mm_equals_emulation_within_the_bound(fmt, dtype, quantize_backward):
    emulated, scaled = pair(fmt, dtype, quantize_backward=quantize_backward)
    x = (torch.randn(3, 7, 72) * torch.logspace(-3, 2, 72)).to(dtype).requires_grad_()
    y_e, y_s = emulated(x), scaled(x)
    grad = torch.randn_like(y_e)
    dx_e, dw_e, db_e = torch.autograd.grad(y_e, (x, emulated.weight, emulated.bias), grad)
    dx_s, dw_s, db_s = torch.autograd.grad(y_s, (x, scaled.weight, scaled.bias), grad)
    assert y_s.dtype == dtype and y_s.shape == y_e.shape
    tokens = x.detach().reshape(-1, 72)
    qx, qw = quantize(tokens, fmt), quantize(scaled.weight.detach(), fmt)
    # Bias: added to both in the working dtype; one more rounding of the sum.
    slack = UNIT_ROUNDOFF[dtype] * (y_e.detach().abs().double() + scaled.bias.abs().double())
    within(y_s.reshape(-1, 40), y_e.reshape(-1, 40), bound(qx, qw, dtype) + slack.reshape(-1, 40))
    g = grad.reshape(-1, 40)
    if quantize_backward:
        g = quantize(g, fmt)
    within(dx_s.reshape(-1, 72), dx_e.reshape(-1, 72), bound(g, qw.T, dtype))
    within(dw_s, dw_e, bound(g.T, qx.T, dtype))
    torch.testing.assert_close(db_s, db_e)
    # Not vacuous: the emulation of another format is far outside the bound.
    other = quantize(tokens, "fp8_e5m2" if fmt == "fp8_e4m3" else "fp8_e4m3") @ qw.T
    assert ((other.double() - y_s.detach().reshape(-1, 40).double() + scaled.bias).abs()
            > bound(qx, qw, dtype) + slack.reshape(-1, 40)).any()


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 70), n=st.integers(1, 20), m=st.integers(1, 9),
    fmt=st.sampled_from(TENSORWISE), log_scale=st.floats(-30, 30),
    rounding=st.sampled_from(["even", "nearest"]), seed=st.integers(0, 2**16),
)
def test_scaled_mm_bound_holds_for_any_shape_and_scale(k, n, m, fmt, log_scale, rounding, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 2.0**log_scale
    layer = QuantizedLinear(k, n, bias=False, fmt=fmt, rounding=rounding, backend="scaled_mm")
    qx, qw = quantize(x, fmt, rounding=rounding), quantize(layer.weight.detach(), fmt,
                                                          rounding=rounding)
    within(layer(x).detach(), qx @ qw.T, bound(qx, qw, torch.float32) + 1e-45)


def test_auto_is_emulated_on_cpu_and_scaled_mm_is_asked_for(monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 32)
    QuantizedLinear(32, 16, fmt="fp8_e4m3")(x)
    assert QuantizedLinear(32, 16, fmt="fp8_e4m3").backend == "auto" and calls == []
    QuantizedLinear(32, 16, fmt="fp8_e4m3", backend="scaled_mm")(x)
    assert calls == [1]


def fake_cuda(monkeypatch, major: int, minor: int) -> torch.device:
    """A CUDA device of the given compute capability, as far as use_scaled_mm can tell."""
    props = SimpleNamespace(major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("capability", "formats", "expected"),
    [
        ((8, 0), ("fp8_e4m3",) * 2, False),  # A100: no FP8 tensor cores
        ((8, 9), ("fp8_e4m3",) * 2, True),  # L4 / RTX 4090
        ((9, 0), ("fp8_e4m3", "fp8_e5m2"), True),  # H100 / H200
        ((9, 0), ("fp8_e5m2",) * 2, False),  # no e5m2 x e5m2 kernel
        ((9, 0), ("mxfp8_e4m3",) * 2, False),  # MX needs Blackwell
        ((10, 0), ("mxfp8_e4m3",) * 2, True),  # B200
        ((10, 0), ("mxfp6_e2m3",) * 2, False),  # no float8 element
        ((10, 0), ("fp8_e4m3", "mxfp8_e4m3"), False),  # mixed scalings
    ],
)
def test_auto_picks_scaled_mm_only_where_the_gpu_has_kernels(
    monkeypatch, capability, formats, expected
):
    device = fake_cuda(monkeypatch, *capability)
    w_fmt, a_fmt = map(parse, formats)
    assert use_scaled_mm("auto", device, w_fmt, a_fmt, None) is expected
    assert use_scaled_mm("emulated", device, w_fmt, a_fmt, None) is False
    if expected:
        assert use_scaled_mm("scaled_mm", device, w_fmt, a_fmt, None) is True
    # quantize_backward with a gradient format without a kernel: emulated as a whole.
    assert use_scaled_mm("auto", device, w_fmt, a_fmt, parse("mxfp6_e3m2")) is False


def test_forcing_scaled_mm_where_it_cannot_run_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"'mxfp6_e2m3'.*Formats it runs: fp8_e4m3"):
        QuantizedLinear(32, 16, fmt="mxfp6_e2m3", backend="scaled_mm")
    with pytest.raises(ValueError, match="per-tensor x block"):
        QuantizedLinear(32, 16, w_fmt="fp8_e4m3", a_fmt="mxfp8_e4m3", backend="scaled_mm")
    with pytest.raises(ValueError, match=r"'fast'.*auto, emulated, scaled_mm"):
        QuantizedLinear(32, 16, fmt="fp8_e4m3", backend="fast")
    with pytest.raises(ValueError, match="Valid backends"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp8_e4m3", backend="gpu")
    with pytest.raises(ValueError, match="Formats it runs"):
        LowPrecision("mxfp4_e2m1", backend="scaled_mm")
    with pytest.raises(ValueError, match="Valid backends"):
        LowPrecisionPlugin(backend="tensor_cores")
    mx = QuantizedLinear(64, 32, fmt="mxfp8_e4m3", backend="scaled_mm")
    with pytest.raises(ValueError, match=r"mxfp8_e4m3 on cpu: .*MX.*Valid backends here"):
        mx(torch.randn(2, 64))
    device = fake_cuda(monkeypatch, 8, 0)
    with pytest.raises(ValueError, match=r"on cuda:0: .*8.9 or newer, got \(8, 0\)"):
        use_scaled_mm("scaled_mm", device, parse("fp8_e4m3"), parse("fp8_e4m3"), None)


def test_backend_shows_in_repr_and_plugin_state():
    assert "backend" not in repr(QuantizedLinear(4, 4, fmt="fp8_e4m3"))
    assert "backend=scaled_mm" in repr(QuantizedLinear(4, 4, fmt="fp8_e4m3", backend="scaled_mm"))
    plugin = LowPrecision("fp8_e4m3", backend="emulated")
    assert plugin.state_dict()["backend"] == "emulated"
    assert repr(plugin) == "LowPrecision('fp8_e4m3', backend='emulated')"
    assert repr(LowPrecision("fp8_e4m3")) == "LowPrecision('fp8_e4m3')"


@pytest.mark.parametrize("quantize_backward", [False, True])
def test_compiles_without_graph_breaks(quantize_backward):
    emulated, layer = pair("fp8_e4m3", torch.float32, quantize_backward=quantize_backward)
    x = torch.randn(2, 5, 72)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_c, y_e = compiled(xs[0]), layer(xs[1])
    torch.testing.assert_close(y_c, y_e)
    y_c.square().sum().backward()
    y_e.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)


def test_plugin_trains_a_gpt_on_scaled_mm(loader, monkeypatch):
    """Trainer with fp8_e4m3 on _scaled_mm (bf16 autocast): every block Linear runs through it
    and the loss falls, as with the emulated backend, to within a small difference."""
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses = {}
    for backend in ("emulated", "scaled_mm"):
        module = GPTModule(seed=0)
        plugin = LowPrecisionPlugin("fp8_e4m3", backend=backend, autocast="bf16", device="cpu")
        trainer = L.Trainer(plugins=[plugin], max_steps=8, **trainer_kwargs())
        trainer.fit(module, loader)
        losses[backend] = module.losses
    assert len(calls) == 8 * 8  # 8 steps x 8 block Linears, forward only (straight-through)
    assert losses["scaled_mm"][-1] < losses["scaled_mm"][0] - 0.5
    assert abs(losses["scaled_mm"][-1] - losses["emulated"][-1]) < 0.05


def test_fabric_raises_before_training_on_a_device_without_kernels():
    fabric = L.Fabric(accelerator="cpu", devices=1,
                      plugins=[LowPrecision("mxfp8_e4m3", backend="scaled_mm")])
    model = fabric.setup(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="on cpu"):
        model(torch.randn(2, 64))


def test_unaligned_shapes_are_padded_exactly():
    """K and N not multiples of 16: the zero padding changes nothing (CUDA needs it)."""
    x = torch.randn(3, 21)
    layer = QuantizedLinear(21, 5, bias=False, fmt="fp8_e4m3", backend="scaled_mm")
    qx, qw = quantize(x, "fp8_e4m3"), quantize(layer.weight.detach(), "fp8_e4m3")
    within(layer(x).detach(), qx @ qw.T, bound(qx, qw, torch.float32))


def test_straight_through_backward_keeps_float8_operands_only():
    """The backward of the default (straight-through) scaled_mm layer needs the quantized
    operands; it keeps them as float8 (1 byte per element), not in the working dtype."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    layer = QuantizedLinear(64, 32, fmt="fp8_e4m3", backend="scaled_mm")
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    big = [(dtype, n) for dtype, n in saved if n > 1]
    assert sorted(big, key=str) == sorted(
        [(torch.float8_e4m3fn, 8 * 64), (torch.float8_e4m3fn, 32 * 64)], key=str
    )


@pytest.mark.parametrize("fmt", TENSORWISE + BLOCKWISE)
@pytest.mark.parametrize("quantize_backward", [False, True])
@pytest.mark.parametrize(("tokens", "d_in", "d_out"), [(6, 40, 24), (130, 96, 33), (64, 256, 128)])
def test_float8_matmuls_meet_the_cuda_kernels_layout_rules(fmt, quantize_backward, tokens, d_in,
                                                           d_out):
    """On meta tensors torch checks a scaled matmul as it would on CUDA (row-major A, column-
    major B, K and N multiples of 16, MX scale counts, dtypes and swizzle), so the three
    matmuls of a layer, unaligned shapes included, are checked here without a GPU."""
    f = parse(fmt)
    x = torch.randn(tokens, d_in, device="meta", requires_grad=True)
    weight = torch.randn(d_out, d_in, device="meta", requires_grad=True)
    y = scaled_mm_linear(x, weight, None, f, f, f if quantize_backward else None, "even")
    assert y.shape == (tokens, d_out) and y.dtype == torch.float32
    dx, dw = torch.autograd.grad(y, (x, weight), torch.ones_like(y))
    assert dx.shape == x.shape and dw.shape == weight.shape


def record_float8_matmuls(monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """Patch both float8 matmuls to record ``(a, b, scale_a, scale_b, out_dtype)`` (``b`` as
    rows of the reduction axis, as ``quantize_operand`` returns it); per-tensor ones still run,
    block-scaled ones (no CPU kernel) return zeros."""
    calls = []
    real = torch._scaled_mm

    def tensorwise(a, b, scale_a, scale_b, out_dtype):
        calls.append((a, b.T, scale_a, scale_b, out_dtype))
        return real(a, b, scale_a, scale_b, out_dtype=out_dtype)

    def blockwise(a, b, scale_a, recipe_a, scale_b, recipe_b, *, output_dtype, **_):
        calls.append((a, b.T, scale_a, scale_b, output_dtype))
        return torch.zeros(a.shape[0], b.shape[1], dtype=output_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", tensorwise)
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", blockwise)
    return calls


def same_operand(recorded: tuple[torch.Tensor, torch.Tensor], expected, fmt) -> bool:
    """A recorded float8 operand (elements, scales as the kernel got them) equals
    ``quantize_operand``'s ``expected``, bit for bit; ``recorded`` may have padded rows."""
    (el, sc), (el_e, sc_e) = recorded, expected
    if fmt.scaling == "block":
        # Zero rows padded before the swizzle are the swizzle's own padding: same bytes.
        sc, sc_e = sc.view(torch.uint8), _swizzle(sc_e).view(torch.uint8)
    return torch.equal(el[: el_e.shape[0]].view(torch.uint8), el_e.view(torch.uint8)) and (
        torch.equal(sc, sc_e))


@pytest.mark.parametrize("fmt", TENSORWISE + BLOCKWISE)
@pytest.mark.parametrize("quantize_backward", [False, True])
def test_autocast_quantizes_the_fp32_operands_not_their_bf16_casts(monkeypatch, fmt,
                                                                   quantize_backward):
    """Under bf16 autocast every float8 operand (forward and quantized backward) holds the
    codes and scales of the fp32 ``x`` and ``W``; the kernels write bf16, the gradients come
    back fp32. Quantizing the bf16 casts (the old behaviour) rounds twice: other codes and,
    per-tensor, another scale."""
    f = parse(fmt)
    calls = record_float8_matmuls(monkeypatch)
    monkeypatch.setattr("lightning_lowprec.nn.use_scaled_mm", lambda *args: True)  # MX on CPU
    torch.manual_seed(0)
    layer = QuantizedLinear(72, 40, fmt=fmt, backend="scaled_mm",
                            quantize_backward=quantize_backward)
    x = (torch.randn(6, 72) * torch.logspace(-2, 1, 72)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    grad = torch.randn(6, 40).to(torch.bfloat16)
    dx, dw = torch.autograd.grad(y, (x, layer.weight), grad)
    assert y.dtype == torch.bfloat16 and dx.dtype == dw.dtype == torch.float32
    w = layer.weight.detach()
    expected = [(quantize_operand(x.detach(), f, "even"), quantize_operand(w, f, "even"))]
    if quantize_backward:
        expected += [
            (quantize_operand(grad, f, "even"), quantize_operand(w.T.contiguous(), f, "even")),
            (quantize_operand(grad.T.contiguous(), f, "even"),
             quantize_operand(x.detach().T.contiguous(), f, "even")),
        ]
    for (a, b, scale_a, scale_b, out_dtype), (qa, qb) in zip(calls, expected, strict=True):
        assert out_dtype == torch.bfloat16
        assert same_operand((a, scale_a), qa, f) and same_operand((b, scale_b), qb, f)
    # Not vacuous: the bf16 casts quantize to other float8 operands.
    cast = quantize_operand(w.to(torch.bfloat16), f, "even")
    assert not same_operand(cast, expected[0][1], f)
