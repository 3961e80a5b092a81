"""Per-layer format mappings (quantize_linears, the plugins, lowprec.fmt) and recommend_formats."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from conftest import BLOCK_LINEARS, GPTModule, make_gpt, trainer_kwargs
from torch import nn

from lightning_lowprec import (
    LowPrecision,
    LowPrecisionPlugin,
    QuantizedLinear,
    quantize,
    quantize_linears,
)
from lightning_lowprec.litgpt.options import LowPrecOptions
from lightning_lowprec.nn import layer_formats
from lightning_lowprec.policy import SQNR, bits_per_weight, layer_sqnr, recommend_formats


def formats_of(model: nn.Module) -> dict[str, str]:
    return {name: m.w_fmt.name for name, m in model.named_modules()
            if isinstance(m, QuantizedLinear)}


# --------------------------------------------------------------------------------------------
# The mapping form
# --------------------------------------------------------------------------------------------


def test_mapping_gives_each_layer_the_first_matching_format():
    gpt = make_gpt()
    mapping = {"h.0.attn.qkv": "mxfp4_e2m1", "attn": "mxfp8_e4m3", "mlp.fc": "mxfp6_e2m3",
               "h.1.mlp.proj": None}
    names = quantize_linears(gpt, mapping)
    assert formats_of(gpt) == {
        "transformer.h.0.attn.qkv": "mxfp4_e2m1", "transformer.h.0.attn.proj": "mxfp8_e4m3",
        "transformer.h.0.mlp.fc": "mxfp6_e2m3", "transformer.h.1.attn.qkv": "mxfp8_e4m3",
        "transformer.h.1.attn.proj": "mxfp8_e4m3", "transformer.h.1.mlp.fc": "mxfp6_e2m3",
    }
    assert names == list(formats_of(gpt))
    layer = gpt.transformer.h[0].attn.qkv
    assert layer.a_fmt.name == "mxfp4_e2m1" and layer.g_fmt is None
    assert type(gpt.transformer.h[0].mlp.proj) is nn.Linear  # no pattern: left alone
    assert type(gpt.transformer.h[1].mlp.proj) is nn.Linear  # None: full precision
    # "*" still leaves the default exclude (lm_head) alone; quantize_backward quantizes g too.
    gpt = make_gpt()
    assert quantize_linears(gpt, {"*": "mxfp6_e2m3"}, quantize_backward=True) == BLOCK_LINEARS
    assert gpt.transformer.h[1].mlp.fc.g_fmt.name == "mxfp6_e2m3"


def test_mapping_errors_and_warnings():
    with pytest.raises(ValueError, match="Unknown number format 'mxfp5'"):
        quantize_linears(make_gpt(), {"attn": "mxfp5"})
    with pytest.raises(ValueError, match="at least one"):
        quantize_linears(make_gpt(), {})
    with pytest.raises(ValueError, match=r"patterns \(strings\), got 3"):
        quantize_linears(make_gpt(), {3: "mxfp4_e2m1"})
    with pytest.raises(ValueError, match="no w_fmt/a_fmt/g_fmt"):
        quantize_linears(make_gpt(), {"attn": "mxfp4_e2m1"}, a_fmt="mxfp8_e4m3")
    with pytest.raises(ValueError, match="quantizes no Linear layer"), pytest.warns(UserWarning):
        quantize_linears(make_gpt(), {"decoder": "mxfp4_e2m1"})
    with pytest.warns(UserWarning, match="'decoder' matches no Linear layer"):
        quantize_linears(make_gpt(), {"decoder": "mxfp4_e2m1", "attn": "mxfp6_e2m3"})


def test_plugins_accept_a_mapping(loader):
    mapping = {"attn": "mxfp8_e4m3", "mlp": "mxfp4_e2m1"}
    plugin = LowPrecision(mapping)
    assert plugin.state_dict()["fmt_map"] == mapping
    assert repr(plugin) == f"LowPrecision({mapping!r})"
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = fabric.setup(make_gpt())
    assert set(formats_of(model).values()) == {"mxfp8_e4m3", "mxfp4_e2m1"}
    assert len(formats_of(model)) == 8
    with pytest.raises(ValueError, match="no w_fmt/a_fmt/g_fmt"):
        LowPrecision(mapping, w_fmt="mxfp6_e2m3")

    # The Trainer's names are the LightningModule's (gpt.transformer...): a GPT's mapping of
    # full layer names still applies (trailing components).
    module = GPTModule()
    per_layer = {name: "mxfp4_e2m1" if "mlp" in name else "mxfp8_e4m3" for name in BLOCK_LINEARS}
    trainer = L.Trainer(plugins=[LowPrecisionPlugin(per_layer)], max_steps=1,
                        **trainer_kwargs())
    trainer.fit(module, loader)
    assert formats_of(module) == {f"gpt.{n}": f for n, f in per_layer.items()}


def test_lowprec_section_takes_a_mapping():
    options = LowPrecOptions.from_mapping({"fmt": {"attn": "mxfp8_e4m3", "*": "mxfp4_e2m1"}})
    assert options.as_mapping()["fmt"] == {"attn": "mxfp8_e4m3", "*": "mxfp4_e2m1"}
    assert LowPrecision(options.fmt, exclude=options.exclude).fmt_map is not None
    with pytest.raises(ValueError, match="Unknown number format 'fp3'"):
        LowPrecOptions.from_mapping({"fmt": {"attn": "fp3"}})
    with pytest.raises(ValueError, match="Invalid lowprec.fmt: 'fp3'"):
        LowPrecOptions.from_mapping({"fmt": "fp3"})


# --------------------------------------------------------------------------------------------
# layer_sqnr and recommend_formats
# --------------------------------------------------------------------------------------------


def db(x: torch.Tensor, fmt: str) -> float:
    """The slow reference: SQNR of quantizing ``x`` along its last axis, in dB."""
    x = x.double()
    noise = (x - quantize(x.float(), fmt).double()).square().sum()
    return 10 * math.log10(x.square().sum() / noise)


def batches(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 4096, (2, 32), generator=generator) for _ in range(count)]


def test_layer_sqnr_matches_a_direct_computation():
    gpt = make_gpt()
    inputs = {}
    layer = gpt.transformer.h[1].mlp.proj
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", []).append(a[0]))
    measured = layer_sqnr(gpt, batches())
    handle.remove()
    assert list(measured) == BLOCK_LINEARS
    x = torch.cat([t.flatten(0, 1) for t in inputs["x"]])
    for fmt in ("mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3"):
        got = measured["transformer.h.1.mlp.proj"][fmt]
        assert got.weight_db == pytest.approx(db(layer.weight.detach(), fmt), abs=1e-3)
        assert got.activation_db == pytest.approx(db(x, fmt), abs=1e-3)
    sqnr = measured["transformer.h.0.attn.qkv"]
    assert sqnr["mxfp4_e2m1"].worst_db + 5 < sqnr["mxfp6_e2m3"].worst_db
    assert gpt.training  # the mode is restored


def test_recommend_picks_the_cheapest_format_meeting_the_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        # The first layer's weights already lie on FP4's grid: FP4 is exact for them.
        model[0].weight.copy_(quantize(model[0].weight, "mxfp4_e2m1"))
    x = [torch.randn(16, 64)]
    measured = layer_sqnr(model, x)
    w1, w0 = measured["1"], measured["0"]
    assert w0["mxfp4_e2m1"].weight_db == math.inf > w1["mxfp4_e2m1"].weight_db
    bound = (w0["mxfp4_e2m1"].worst_db + w1["mxfp4_e2m1"].worst_db) / 2
    assert w0["mxfp4_e2m1"].worst_db >= bound > w1["mxfp4_e2m1"].worst_db
    policy = recommend_formats(model, x, min_sqnr_db=bound)
    expected_1 = next(f for f in ("mxfp6_e2m3", "mxfp8_e4m3") if w1[f].worst_db >= bound)
    assert policy == {"0": "mxfp4_e2m1", "1": expected_1}
    assert recommend_formats(model, x, min_sqnr_db=-10.0) == dict.fromkeys("01", "mxfp4_e2m1")
    with pytest.warns(UserWarning, match="No candidate reaches 500"):
        best = recommend_formats(model, x, min_sqnr_db=500.0)
    assert best == {name: max(s, key=lambda f: s[f].worst_db) for name, s in measured.items()}
    quantize_linears(model, policy)  # the mapping is one the plugin takes
    assert formats_of(model) == policy


def test_recommend_on_a_gpt_and_bad_arguments():
    gpt = make_gpt()
    policy = recommend_formats(gpt, batches(), min_sqnr_db=20.0)
    assert list(policy) == BLOCK_LINEARS
    assert {n: f.name for n, f in layer_formats(gpt, policy).items()} == policy
    with pytest.raises(ValueError, match="min_sqnr_db must be a finite number"):
        recommend_formats(gpt, batches(), min_sqnr_db=math.nan)
    with pytest.raises(ValueError, match="at least one batch"):
        layer_sqnr(gpt, [])
    with pytest.raises(ValueError, match="Unknown number format"):
        layer_sqnr(gpt, batches(), candidates=("mxfp3",))
    assert bits_per_weight("mxfp4_e2m1") == 4.25 and bits_per_weight("fp8_e4m3") == 8
    assert SQNR(3.0, 2.0).worst_db == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recommend_formats(gpt, batches(1), candidates=("mxfp8_e4m3",), min_sqnr_db=0.0)
