"""Packed MX checkpoints: bit-exact round trips, true-width sizes, a litgpt GPT end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_gpt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from lightning_lowprec import FORMATS, quantize, quantize_linears
from lightning_lowprec.export import (
    METADATA_KEY,
    PackedLinear,
    export_mx,
    load_mx,
    pack,
    unpack,
)
from lightning_lowprec.quantizer import SCALE_RULES

MX_FORMATS = [name for name, f in FORMATS.items() if f.scaling == "block"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 2.0**-149, -(2.0**-140), 3.0e38]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros and NaN included), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(INT_VIEW[a.dtype]), b.contiguous().view(INT_VIEW[b.dtype])
    )


@st.composite
def weights(draw):
    """A 1-3-D tensor whose last axis is ragged or whole blocks, over the whole fp32 range:
    block scales from E8M0's bottom (subnormal results) to its top, zero blocks, specials."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))]
    shape.append(draw(st.sampled_from([1, 5, 31, 32, 33, 64, 70, 97])))
    n = math.prod(shape)
    exponent = draw(st.integers(-150, 126))
    kind = draw(st.sampled_from(["one_scale", "full_range", "zeros"]))
    if kind == "full_range":
        element = st.floats(width=32, allow_nan=False, allow_infinity=False)
    elif kind == "zeros":
        element = st.sampled_from([0.0, -0.0])
    else:
        element = st.floats(-2.0, 2.0, width=32).map(lambda m: m * 2.0**exponent)
    values = draw(st.lists(element, min_size=n, max_size=n))
    for _ in range(draw(st.integers(0, 2))):
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return x.to(dtype), draw(st.sampled_from(MX_FORMATS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weights(), st.sampled_from(SCALE_RULES))
def test_unpack_of_pack_is_quantize_bit_for_bit(args, rule):
    w, fmt = args
    codes, scales = pack(w, fmt, rule)
    assert bits_equal(unpack(codes, scales, fmt, w.shape, w.dtype),
                      quantize(w, fmt, scale_rule=rule))


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rceil_round_trip_is_exact_and_keeps_rceil_scales(fmt, dtype):
    """Every MX format: rceil codes and scales decode to ``quantize(..., scale_rule="rceil")``
    bit for bit, also where the rules choose different scales (block maxima just above the
    element max times a power of two: floor saturates them, rceil takes the next scale)."""
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 70, generator=gen) * torch.logspace(-20, 20, 16)[:, None]
    w[:, 0] = f.max * 1.005 * 2.0 ** torch.arange(-8, 8).float()  # floor saturates these
    w[3, 40] = math.nan
    # rceil's ceiling would round this block's max up past fp32's max (found by hypothesis):
    # the scale is capped to keep it finite (see test_scale_rule.py), and it round-trips.
    w[5, 69] = 3.2965e38
    w = w.to(dtype)
    codes, scales = pack(w, fmt, "rceil")
    assert bits_equal(unpack(codes, scales, fmt, w.shape, dtype),
                      quantize(w, fmt, scale_rule="rceil"))
    _, floor_scales = pack(w, fmt, "floor")
    assert (scales != floor_scales).any()  # not vacuous: the rule is in the scales
    assert not bits_equal(quantize(w, fmt, scale_rule="rceil"), quantize(w, fmt))


def test_an_rceil_model_exports_and_loads_back_exactly(tmp_path):
    """A GPT trained with rceil scales: the export records the rule, ``load_mx`` returns the
    rceil weights, and packed layers quantize their input with rceil too, so the logits equal
    the fake-quantized model's bit for bit (and differ from floor's)."""
    gpt = make_gpt()
    quantize_linears(gpt, "mxfp8_e4m3", scale_rule="rceil")
    path = tmp_path / "m.safetensors"
    formats = export_mx(gpt, None, path)
    with safe_open(str(path), "pt") as file:
        entries = json.loads(file.metadata()[METADATA_KEY])["tensors"]
    assert {entries[key]["scale_rule"] for key in formats} == {"rceil"}
    state = load_mx(path)
    for key in formats:
        expected = quantize(gpt.state_dict()[key], "mxfp8_e4m3", scale_rule="rceil")
        assert bits_equal(state[key], expected), key
    packed = load_mx(path, make_gpt(seed=1), dequantize=False)
    assert packed.transformer.h[0].attn.qkv.scale_rule == "rceil"
    assert "scale_rule=rceil" in repr(packed.transformer.h[0].attn.qkv)
    with torch.no_grad():
        expected = gpt(tokens())
        assert torch.equal(packed(tokens()), expected)
        quantize_linears(gpt, "mxfp8_e4m3")  # floor: other logits
        assert not torch.equal(gpt(tokens()), expected)


def test_scale_rule_argument_overrides_the_layers_and_applies_to_state_dicts(tmp_path):
    gpt = make_gpt()
    quantize_linears(gpt, "mxfp6_e2m3", scale_rule="rceil")
    export_mx(gpt, None, tmp_path / "a.safetensors", scale_rule="floor")
    key = "transformer.h.0.mlp.fc.weight"
    weight = gpt.state_dict()[key]
    assert bits_equal(load_mx(tmp_path / "a.safetensors")[key], quantize(weight, "mxfp6_e2m3"))
    export_mx(gpt.state_dict(), {"transformer.h": "mxfp6_e2m3"}, tmp_path / "b.safetensors",
              scale_rule="rceil")
    assert bits_equal(load_mx(tmp_path / "b.safetensors")[key],
                      quantize(weight, "mxfp6_e2m3", scale_rule="rceil"))
    with pytest.raises(ValueError, match=r"Unknown scale_rule 'ceil'.*floor, rceil"):
        export_mx(gpt, None, tmp_path / "c.safetensors", scale_rule="ceil")
    with pytest.raises(ValueError, match=r"Unknown scale_rule 'ceil'.*floor, rceil"):
        pack(weight, "mxfp6_e2m3", "ceil")
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("length", [1, 31, 32, 33, 100])
def test_packed_sizes_are_the_true_width(fmt, length):
    f = FORMATS[fmt]
    w = torch.randn(3, length)
    codes, scales = pack(w, fmt)
    group = {4: 2, 6: 4, 8: 1}[f.bits]  # codes per byte group: 2 per byte, 4 per 3 bytes
    assert codes.dtype == scales.dtype == torch.uint8
    assert codes.numel() == math.ceil(w.numel() / group) * group * f.bits // 8
    assert scales.shape == (3, math.ceil(length / 32))


def test_nan_block_scale_and_signed_zero_codes():
    w = torch.zeros(2, 64)
    w[0, 3] = math.nan
    w[1, :32] = -0.0
    w[1, 32], w[1, 33:] = 1.0, -1e-30  # beside 1.0, -1e-30 rounds to -0.0 in every format
    for fmt in MX_FORMATS:
        codes, scales = pack(w, fmt)
        assert scales[0, 0] == 0xFF and scales[0, 1] != 0xFF
        out = unpack(codes, scales, fmt, w.shape, w.dtype)
        assert out[0, :32].isnan().all()
        assert torch.signbit(out[1, 33:]).all() and (out[1, 33:] == 0).all()
        assert torch.signbit(out[1, :32]).all() and (out[1, :32] == 0).all()


def test_pack_refuses_per_tensor_formats():
    with pytest.raises(ValueError, match="MX format .*mxfp8_e4m3.*got .fp8_e4m3."):
        pack(torch.randn(4, 32), "fp8_e4m3")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_pack_refuses_what_quantize_refuses(dtype):
    """Its docstring promised it; it packed fp32 grid values of a float64 or int weight."""
    with pytest.raises(ValueError, match=f"got {dtype}.*Valid dtypes: torch.float32"):
        pack(torch.ones(4, 32, dtype=dtype), "mxfp8_e4m3")


# --------------------------------------------------------------------------------------------
# A litgpt GPT end to end
# --------------------------------------------------------------------------------------------


def tokens():
    return torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def exported(tmp_path):
    gpt = make_gpt()
    path = tmp_path / "model.safetensors"
    formats = export_mx(gpt, "mxfp6_e2m3", path)
    return gpt, path, formats


def test_loaded_state_dict_is_quantize_of_the_weights_and_the_rest_unchanged(exported):
    gpt, path, formats = exported
    assert set(formats) == {f"{n}.weight" for n, m in gpt.named_modules()
                            if type(m) is nn.Linear and n != "lm_head"} and len(formats) == 8
    state = load_mx(path)
    reference = gpt.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        expected = quantize(value, "mxfp6_e2m3") if key in formats else value
        assert bits_equal(state[key], expected), key


def test_loaded_model_logits_equal_the_fake_quantized_model_exactly(exported):
    gpt, path, _ = exported
    fake = copy.deepcopy(gpt)
    quantize_linears(fake, "mxfp6_e2m3")
    with torch.no_grad():
        expected = fake(tokens())
        # Plain dequantized weights, quantized again by the plugin's layers (a no-op on them).
        loaded = load_mx(path, make_gpt(seed=1))
        quantize_linears(loaded, "mxfp6_e2m3")
        assert torch.equal(loaded(tokens()), expected)
        # Packed weights decoded per forward.
        packed = load_mx(path, make_gpt(seed=1), dequantize=False)
        assert isinstance(packed.transformer.h[0].attn.qkv, PackedLinear)
        assert torch.equal(packed(tokens()), expected)
        assert not torch.equal(gpt(tokens()), expected)


@pytest.mark.parametrize("shape", [(2, 1), (3, 40), (64, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_nan_block_unpacks_to_quantizes_nan_bits(shape, dtype):
    """CPU's vectorised fp32 -> bf16 cast writes NaN as 0xFFFF, the scalar one 0x7FC0: unpack
    must cast the same padded buffer as quantize does (found by hypothesis: a (2, 1) bf16
    weight holding a NaN)."""
    w = torch.randn(shape).to(dtype)
    w.view(-1)[0] = float("nan")
    codes, scales = pack(w, "mxfp8_e4m3")
    assert bits_equal(unpack(codes, scales, "mxfp8_e4m3", w.shape, dtype),
                      quantize(w, "mxfp8_e4m3"))


def test_metadata_names_every_tensor_and_its_format(tmp_path):
    gpt = make_gpt()
    mapping = {"attn.qkv": "mxfp8_e4m3", "mlp": "mxfp4_e2m1", "*": None}
    formats = export_mx(gpt, mapping, tmp_path / "m.safetensors")
    assert formats["transformer.h.1.attn.qkv.weight"] == "mxfp8_e4m3"
    assert formats["transformer.h.0.mlp.fc.weight"] == "mxfp4_e2m1"
    assert "transformer.h.0.attn.proj.weight" not in formats  # "*": None keeps it in fp32
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as file:
        entries = json.loads(file.metadata()[METADATA_KEY])["tensors"]
        stored = set(file.keys())
    assert entries.keys() == gpt.state_dict().keys()
    assert entries["transformer.h.0.mlp.proj.weight"]["format"] == "mxfp4_e2m1"
    assert entries["transformer.h.0.mlp.proj.weight"]["scale_rule"] == "floor"
    assert entries["transformer.wte.weight"] == {
        "format": None, "dtype": "float32", "shape": [4096, 128]}
    assert "transformer.h.0.mlp.proj.weight.codes" in stored
    assert "transformer.h.0.attn.proj.weight" in stored


def test_fmt_none_exports_the_formats_the_model_trains_with(tmp_path):
    gpt = make_gpt()
    quantize_linears(gpt, "mxfp4_e2m1", include="mlp")
    formats = export_mx(gpt, None, tmp_path / "m.safetensors")
    assert set(formats.values()) == {"mxfp4_e2m1"} and len(formats) == 4
    with pytest.raises(ValueError, match="QuantizedLinear"):
        export_mx(make_gpt(), None, tmp_path / "n.safetensors")


def test_state_dict_needs_a_mapping_and_bad_formats_fail(tmp_path):
    state = make_gpt().state_dict()
    with pytest.raises(ValueError, match="state dict does not say"):
        export_mx(state, "mxfp6_e2m3", tmp_path / "a.safetensors")
    formats = export_mx(state, {"transformer.h": "mxfp6_e2m3"}, tmp_path / "b.safetensors")
    assert len(formats) == 8 and all(k.endswith(".weight") for k in formats)
    with pytest.raises(ValueError, match="per-tensor scale"):
        export_mx(make_gpt(), "fp8_e5m2", tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="Unknown number format 'mxfp5'"):
        export_mx(make_gpt(), {"*": "mxfp5"}, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="pass the model"):
        load_mx(tmp_path / "b.safetensors", dequantize=False)


def test_lowprec_litgpt_export_mx_writes_beside_the_checkpoint(tmp_path, capsys):
    from lightning_lowprec.litgpt.checkpoint import make_checkpoint
    from lightning_lowprec.litgpt.export import EXPORT_FILE
    from lightning_lowprec.litgpt.runner import main

    directory = make_checkpoint(tmp_path / "final", n_layer=1)
    with pytest.raises(ValueError, match="--fmt"):
        main(["export_mx", str(directory)])  # no lowprec.yaml: nothing recorded
    (directory / "lowprec.yaml").write_text("lowprec:\n  fmt: mxfp4_e2m1\n  exclude: [lm_head]\n")
    main(["export_mx", str(directory)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(directory / EXPORT_FILE) and summary["formats"] == {
        "mxfp4_e2m1": 4}
    assert summary["bytes"] < summary["source_bytes"]
    main(["export_mx", str(directory), "--fmt", "{mlp: mxfp8_e4m3}"])
    assert json.loads(capsys.readouterr().out)["formats"] == {"mxfp8_e4m3": 2}
    (directory / "lowprec.yaml").write_text("lowprec:\n  fmt: mxfp8_e4m3\n  scale_rule: rceil\n")
    main(["export_mx", str(directory)])
    with safe_open(str(directory / EXPORT_FILE), "pt") as file:
        entries = json.loads(file.metadata()[METADATA_KEY])["tensors"]
    assert {e["scale_rule"] for e in entries.values() if e["format"]} == {"rceil"}


@pytest.mark.slow
def test_runner_trains_with_a_per_layer_mapping_and_exports_it_exactly(tmp_path, capsys):
    """lowprec.fmt as a mapping through a real lowprec-litgpt fine-tune, recorded in
    lowprec.yaml, exported by `lowprec-litgpt export_mx` with the recorded formats."""
    import yaml
    from litgpt import GPT, Config

    from lightning_lowprec.litgpt.checkpoint import make_default
    from lightning_lowprec.litgpt.export import EXPORT_FILE
    from lightning_lowprec.litgpt.recipes import tiny_overrides
    from lightning_lowprec.litgpt.runner import main, run

    default = make_default(tmp_path / "default")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "finetune_full-lmd-mxfp6.yaml"
    out = tmp_path / "out"
    mapping = {"attn": "mxfp8_e4m3", "*": "mxfp4_e2m1"}
    run("finetune_full", [
        str(default["checkpoint"]), "--config", str(recipe),
        *tiny_overrides("finetune_full-lmd-mxfp6"), "--out_dir", str(out),
        "--data.json_path", str(default["instructions"]), "--train.max_steps", "2",
        "--train.lr_warmup_steps", "1", "--eval.interval", "1000", "--eval.max_iters", "1",
        "--eval.max_new_tokens", "2", "--lowprec.progress_bar", "false",
        "--lowprec.monitor", "null", "--lowprec.fmt", json.dumps(mapping),
    ])
    final = out / "final"
    assert yaml.safe_load((final / "lowprec.yaml").read_text())["lowprec"]["fmt"] == mapping
    capsys.readouterr()  # litgpt's own prints
    main(["export_mx", str(final)])
    assert json.loads(capsys.readouterr().out)["formats"] == {
        "mxfp8_e4m3": 12, "mxfp4_e2m1": 12}
    model = GPT(Config.from_file(final / "model_config.yaml"))
    model.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True)["model"])
    quantize_linears(model, mapping)
    loaded = load_mx(final / EXPORT_FILE, GPT(Config.from_file(final / "model_config.yaml")),
                     dequantize=False)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))


def test_parametrized_weights_must_be_merged_first(tmp_path):
    from lightning_lowprec.multipliers import add_multipliers

    gpt = make_gpt()
    add_multipliers(gpt, placement="paper")
    with pytest.raises(ValueError, match="merge them first"):
        export_mx(gpt, "mxfp6_e2m3", tmp_path / "m.safetensors")


def test_tied_unquantized_tensors_are_stored_and_loaded(tmp_path):
    model = nn.ModuleDict({"emb": nn.Embedding(64, 32), "head": nn.Linear(32, 64, bias=False),
                           "body": nn.Linear(32, 32)})
    model["head"].weight = model["emb"].weight  # tied, as in GPT-2-style models
    formats = export_mx(model, "mxfp4_e2m1", tmp_path / "m.safetensors", exclude="head")
    assert formats == {"body.weight": "mxfp4_e2m1"}
    state = load_mx(tmp_path / "m.safetensors")
    assert torch.equal(state["head.weight"], model["emb"].weight)
    assert torch.equal(state["emb.weight"], model["emb"].weight)
    assert torch.equal(state["body.weight"], quantize(model["body"].weight, "mxfp4_e2m1"))
