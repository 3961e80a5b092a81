"""Learnable multipliers: gradients, placements, merging, exact splitting, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gpt_config, make_gpt
from litgpt import GPT
from torch import nn

from lightning_lowprec.multipliers import (
    Multipliers,
    MultiplierSpec,
    add_multipliers,
    effective_weight,
    merge_multipliers,
    merged_state_dict,
    split_state_dict,
    unmerged_state_dict,
)
from lightning_lowprec.nn import QuantizedLinear, quantize_linears
from lightning_lowprec.optim.groups import is_multiplier, param_groups
from lightning_lowprec.quantizer import quantize

BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
PAPER_LAYERS = ["transformer.wte"] + [
    f"transformer.h.{block}.{layer}" for block in range(2) for layer in BLOCK_LAYERS
]


def randomize_multipliers(model: nn.Module, seed: int = 1) -> None:
    """Move the multipliers away from 1, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if is_multiplier(p):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))


def token_batch(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(0))


def multiplied(model: nn.Module) -> dict[str, Multipliers]:
    return {
        name: module.parametrizations.weight[0]
        for name, module in model.named_modules()
        if hasattr(module, "parametrizations")
    }


# --- gradients: the paper's eq. 4 -----------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["row+column", "scalar", "row+column+scalar", MultiplierSpec(row=2, column=True)],
    ids=str,
)
def test_linear_gradients_equal_eq4(spec):
    torch.manual_seed(0)
    layer = nn.Linear(7, 5, dtype=torch.float64)
    add_multipliers(layer, {"": spec})
    randomize_multipliers(layer)
    mult = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original
    x = torch.randn(3, 7, dtype=torch.float64)
    g_out = torch.randn(3, 5, dtype=torch.float64)
    (layer(x) * g_out).sum().backward()

    # G = dL/dW_eff for y = x W_eff^T + b and L = sum(y * g_out), written out.
    G = g_out.T @ x
    ones = torch.ones(5, dtype=torch.float64)
    r = ones if mult.row_multiplier is None else ones.clone()
    if mult.row_multiplier is not None:
        r[: mult.row_multiplier.shape[0]] = mult.row_multiplier.detach()
    c = torch.ones(7, dtype=torch.float64)
    if mult.column_multiplier is not None:
        c = mult.column_multiplier.detach()
    s = 1.0 if mult.scalar_multiplier is None else mult.scalar_multiplier.detach()
    Wd = W.detach()
    # eq. 4: dL/dW = s r c ⊙ G, dL/dr_i = s Σ_j W_ij c_j G_ij, dL/dc_j = s Σ_i r_i W_ij G_ij,
    # dL/ds = Σ (diag(r) W diag(c)) ⊙ G (= Σ W ⊙ G for a lone scalar).
    torch.testing.assert_close(W.grad, s * r[:, None] * c[None, :] * G)
    if mult.row_multiplier is not None:
        dr = s * (Wd * c[None, :] * G).sum(1)
        torch.testing.assert_close(mult.row_multiplier.grad, dr[: mult.row_multiplier.shape[0]])
    if mult.column_multiplier is not None:
        torch.testing.assert_close(mult.column_multiplier.grad, s * (r[:, None] * Wd * G).sum(0))
    if mult.scalar_multiplier is not None:
        ds = (r[:, None] * Wd * c[None, :] * G).sum()
        torch.testing.assert_close(mult.scalar_multiplier.grad, ds)


def test_embedding_gradients_equal_eq4():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, dtype=torch.float64)
    add_multipliers(emb, "paper")
    randomize_multipliers(emb)
    mult, W = emb.parametrizations.weight[0], emb.parametrizations.weight.original
    idx = torch.tensor([[0, 3, 3], [5, 1, 0]])
    g_out = torch.randn(2, 3, 4, dtype=torch.float64)
    (emb(idx) * g_out).sum().backward()
    G = torch.zeros(6, 4, dtype=torch.float64).index_add_(0, idx.flatten(), g_out.reshape(-1, 4))
    r, c = mult.row_multiplier.detach(), mult.column_multiplier.detach()
    torch.testing.assert_close(W.grad, r[:, None] * c[None, :] * G)
    torch.testing.assert_close(mult.row_multiplier.grad, (W.detach() * c * G).sum(1))
    torch.testing.assert_close(mult.column_multiplier.grad, (r[:, None] * W.detach() * G).sum(0))


# --- placements -----------------------------------------------------------------------------


def test_paper_placement_on_a_litgpt_gpt_keeps_the_function():
    model = make_gpt()
    x = token_batch()
    before = model(x)
    targets = add_multipliers(model, "paper")
    assert list(targets) == PAPER_LAYERS
    assert all(spec == MultiplierSpec(row=True, column=True) for spec in targets.values())
    assert type(model.lm_head) is nn.Linear  # untouched: row multipliers there hurt (paper)
    assert torch.equal(model(x), before)  # init 1: the same function, bit for bit
    names = [n for n, p in model.named_parameters() if is_multiplier(p)]
    assert len(names) == 2 * len(PAPER_LAYERS)


def test_scalar_placement():
    model = make_gpt()
    targets = add_multipliers(model, "scalar", init=2.0)
    assert list(targets) == PAPER_LAYERS
    wte = model.transformer.wte
    assert wte.parametrizations.weight[0].scalar_multiplier.shape == ()
    torch.testing.assert_close(wte.weight, 2 * wte.parametrizations.weight.original)


def test_symmetry_free_on_a_llama_style_gpt():
    torch.manual_seed(0)
    config = gpt_config(mlp_class_name="LLaMAMLP", intermediate_size=256, n_query_groups=2)
    model = GPT(config)
    targets = add_multipliers(model, "symmetry_free")
    query_rows = config.n_head * config.head_size  # 128 of qkv's 256 rows
    assert targets["transformer.h.0.attn.qkv"] == MultiplierSpec(row=query_rows)
    assert targets["transformer.h.0.attn.proj"] == MultiplierSpec(row=True, column=True)
    assert targets["transformer.h.0.mlp.fc_1"] == MultiplierSpec(row=True)
    assert targets["transformer.h.0.mlp.proj"] == MultiplierSpec(row=True, column=True)
    assert "transformer.h.0.mlp.fc_2" not in targets  # up: none
    assert type(model.transformer.h[0].mlp.fc_2) is nn.Linear
    qkv = model.transformer.h[0].attn.qkv
    assert qkv.parametrizations.weight[0].row_multiplier.shape == (query_rows,)
    randomize_multipliers(model)
    raw = qkv.parametrizations.weight.original
    assert torch.equal(qkv.weight[query_rows:], raw[query_rows:])  # keys, values: untouched
    assert not torch.equal(qkv.weight[:query_rows], raw[:query_rows])


def test_symmetry_free_on_pythia_treats_fc_as_a_gate():
    targets = add_multipliers(make_gpt(), "symmetry_free")
    assert targets["transformer.h.1.mlp.fc"] == MultiplierSpec(row=True)
    assert targets["transformer.h.1.mlp.proj"] == MultiplierSpec(row=True, column=True)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.body(self.embed(x))))


def test_generic_rule_for_any_model():
    model = Tiny()
    assert list(add_multipliers(model)) == ["embed", "body.0", "body.2"]
    with pytest.raises(ValueError, match="symmetry_free.*needs a litgpt GPT"):
        add_multipliers(Tiny(), "symmetry_free")


def test_mapping_placement_uses_the_quantize_linears_pattern_rule():
    model = make_gpt()
    targets = add_multipliers(model, {"attn.qkv": "row", "transformer.h.1.mlp": ("column",)})
    assert targets == {
        "transformer.h.0.attn.qkv": MultiplierSpec(row=True),
        "transformer.h.1.attn.qkv": MultiplierSpec(row=True),
        "transformer.h.1.mlp.fc": MultiplierSpec(column=True),
        "transformer.h.1.mlp.proj": MultiplierSpec(column=True),
    }
    assert set(multiplied(model)) == set(targets)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("papers", r"Unknown placement 'papers'\. Valid placements: 'paper', 'symmetry_free'"),
        ({"attn.qkvv": "row"}, r"'attn\.qkvv' matches no module of GPT\. Matrix layers: lm_head"),
        ({"ln_f": "row"}, r"'ln_f' names no matrix layer, only transformer\.ln_f \(LayerNorm\)"),
        ({"attn.qkv": "rows"}, r"Invalid multipliers 'rows': expected kinds from row, column"),
        ({"attn": "row", "qkv": "column"}, r"'attn' \(row\) and 'qkv' \(column\) disagree"),
        ({"attn.qkv": MultiplierSpec(row=10_000)}, r"has 384 rows; a row multiplier for 10000"),
        (["attn.qkv"], r"placement must be one of"),
    ],
)
def test_bad_placements_raise_and_change_nothing(placement, message):
    model = make_gpt()
    with pytest.raises(ValueError, match=message):
        add_multipliers(model, placement)
    assert not multiplied(model)


def test_a_layer_with_multipliers_or_another_parametrization_is_refused():
    model = make_gpt()
    add_multipliers(model, {"attn.proj": "row"})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.proj already has multipliers"):
        add_multipliers(model)
    assert set(multiplied(model)) == {f"transformer.h.{b}.attn.proj" for b in range(2)}
    layer = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(layer, "weight", nn.Identity())
    with pytest.raises(ValueError, match="already has a parametrization"):
        add_multipliers(layer)


def test_tied_weights_and_bad_init_are_refused():
    model = Tiny()
    model.lm_head.weight = model.embed.weight
    with pytest.raises(ValueError, match=r"weight of embed is tied \(embed\.weight, lm_head"):
        add_multipliers(model, {"embed": "row"})
    for init in (0.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="init must be a finite, non-zero number"):
            add_multipliers(Tiny(), init=init)


# --- merging --------------------------------------------------------------------------------


def test_merged_outputs_equal_unmerged_on_a_gpt_and_load_strictly():
    model = make_gpt()
    add_multipliers(model)
    randomize_multipliers(model)
    x = token_batch()
    expected = model(x)

    fresh = make_gpt(seed=3)
    fresh.load_state_dict(merged_state_dict(model.state_dict()), strict=True)
    assert torch.equal(fresh(x), expected)  # the very W_eff the forward used

    weights = {name: p for name, p in model.named_parameters() if not is_multiplier(p)}
    assert merge_multipliers(model) is model
    assert torch.equal(model(x), expected)
    assert type(model.transformer.wte) is nn.Embedding
    assert type(model.transformer.h[0].attn.qkv) is nn.Linear
    assert not any(is_multiplier(p) for p in model.parameters())
    assert not model.transformer.wte._load_state_dict_pre_hooks
    assert model.state_dict().keys() == fresh.state_dict().keys()
    # The same Parameter objects: an optimizer built on the raw weights still holds them.
    plain = dict(model.named_parameters())
    for name, p in weights.items():
        assert plain[name.replace("parametrizations.weight.original", "weight")] is p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_state_dict_is_exact_and_costs_one_byte_per_element(dtype):
    model = make_gpt().to(dtype)
    add_multipliers(model)
    randomize_multipliers(model)
    state = model.state_dict()
    merged, factors = split_state_dict(state)
    back = unmerged_state_dict(merged, factors)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key].view(torch.uint8), value.view(torch.uint8)), key

    corrections = [v for k, v in factors.items() if k.endswith("original")]
    assert len(corrections) == len(PAPER_LAYERS)
    assert all(c.dtype == torch.int8 for c in corrections)
    assert max(c.abs().max().item() for c in corrections) <= 3
    # At init (multipliers 1) division is exact: the corrections are 0-dim zeros.
    fresh = make_gpt()
    add_multipliers(fresh)
    _, at_init = split_state_dict(fresh.state_dict())
    assert all(v.shape == () for k, v in at_init.items() if k.endswith("original"))


def test_a_correction_that_does_not_fit_int8_stores_the_raw_weight():
    layer = nn.Linear(4, 3)
    add_multipliers(layer, {"": "row"})
    with torch.no_grad():
        layer.parametrizations.weight[0].row_multiplier[1] = 0.0  # W_eff row 1 is all zeros
    state = layer.state_dict()
    merged, factors = split_state_dict(state)
    key = "parametrizations.weight.original"
    assert factors[key].dtype == torch.float32 and torch.equal(factors[key], state[key])
    assert torch.equal(unmerged_state_dict(merged, factors)[key], state[key])


def test_a_multiplied_model_loads_a_merged_state_dict_with_multipliers_at_one():
    source = make_gpt()
    add_multipliers(source)
    randomize_multipliers(source)
    x = token_batch()
    expected = source(x)
    target = make_gpt(seed=5)
    add_multipliers(target)
    target.load_state_dict(merged_state_dict(source.state_dict()), strict=True)
    assert torch.equal(target(x), expected)
    multipliers = [p for p in target.parameters() if is_multiplier(p)]
    assert all(torch.equal(p, torch.ones_like(p)) for p in multipliers)
    # and the raw layout still loads as itself
    target.load_state_dict(source.state_dict(), strict=True)
    assert not any(torch.equal(p, torch.ones_like(p)) for p in multipliers)


def test_merged_state_dict_refuses_a_chained_parametrization():
    state = {
        "parametrizations.weight.original": torch.ones(2, 2),
        "parametrizations.weight.0.row_multiplier": torch.ones(2),
        "parametrizations.weight.1.scale": torch.ones(()),
    }
    with pytest.raises(ValueError, match="another parametrization after its multipliers"):
        merged_state_dict(state)


# --- QuantizedLinear, copies, optimizer groups ----------------------------------------------


def test_a_quantized_linear_quantizes_the_effective_weight():
    torch.manual_seed(0)
    layer = QuantizedLinear(64, 32, fmt="mxfp4_e2m1")
    add_multipliers(layer, {"": "row+column"})
    randomize_multipliers(layer)
    x = torch.randn(5, 64)
    w_eff = layer.weight.detach().clone()
    expected = quantize(x, "mxfp4_e2m1") @ quantize(w_eff, "mxfp4_e2m1").T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_quantize_linears_after_add_multipliers_quantizes_the_effective_weight():
    model = make_gpt()
    add_multipliers(model)
    randomize_multipliers(model)
    reference = make_gpt(seed=3)
    reference.load_state_dict(merged_state_dict(model.state_dict()))
    quantize_linears(model, "mxfp4_e2m1")
    quantize_linears(reference, "mxfp4_e2m1")
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv, QuantizedLinear) and multiplied(model)
    x = token_batch()
    assert torch.equal(model(x), reference(x))
    merge_multipliers(model)
    assert type(qkv) is QuantizedLinear
    assert torch.equal(model(x), reference(x))


def test_deepcopy_keeps_the_multiplier_marks_and_groups_find_them():
    model = make_gpt()
    add_multipliers(model)
    twin = copy.deepcopy(model)
    marked = [n for n, p in twin.named_parameters() if is_multiplier(p)]
    assert len(marked) == 2 * len(PAPER_LAYERS)
    groups = {g["name"]: g for g in param_groups(twin)}
    assert len(groups["multipliers"]["params"]) == len(marked)
    assert groups["multipliers"]["weight_decay"] == 2e-3


def test_effective_weight_scales_rows_and_columns():
    weight = torch.arange(6.0).reshape(2, 3)
    row, column = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 10.0, 100.0])
    expected = 3 * torch.tensor([[0.0, 10.0, 200.0], [6.0, 80.0, 1000.0]])
    assert torch.equal(effective_weight(weight, row, column, torch.tensor(3.0)), expected)
