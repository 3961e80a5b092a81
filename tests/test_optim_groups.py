"""param_groups: the usual split by role, for any optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lightning_lowprec import LMD, Madam, MPlusAdam
from lightning_lowprec.optim import MULTIPLIER_ATTR, is_multiplier, mark_multiplier, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(32, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 32, bias=False)
        self.row = mark_multiplier(nn.Parameter(torch.ones(16)))
        self.tied = nn.Linear(8, 32, bias=False)
        self.tied.weight = self.wte.weight


def names(model, group):
    lookup = {id(p): n for n, p in model.named_parameters()}
    return sorted(lookup[id(p)] for p in group["params"])


def test_split_decays_and_adamw_marks():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["matrices", "norms_biases", "embeddings", "multipliers"]
    assert names(model, by_name["matrices"]) == ["fc.weight", "head.weight"]
    assert names(model, by_name["norms_biases"]) == ["fc.bias", "norm.bias", "norm.weight"]
    assert names(model, by_name["embeddings"]) == ["wte.weight"]  # tied: counted once
    assert names(model, by_name["multipliers"]) == ["row"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 2e-3]
    assert "adamw" not in by_name["matrices"]
    assert all(by_name[n]["adamw"] == "always" for n in ("norms_biases", "embeddings",
                                                         "multipliers"))


def test_options_and_errors():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.05, embedding_weight_decay=0.0,
                          multiplier_weight_decay=1e-3, adamw=())
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0, 1e-3]
    assert all("adamw" not in g for g in groups)
    with pytest.raises(ValueError, match="Invalid adamw"):
        param_groups(model, adamw=("norms",))


def test_multiplier_marking():
    p = nn.Parameter(torch.ones(3))
    assert not is_multiplier(p)
    assert mark_multiplier(p) is p and is_multiplier(p) and getattr(p, MULTIPLIER_ATTR)
    assert is_multiplier(copy.deepcopy(p))  # deepcopy keeps a Parameter's class, not its attributes
    buffer = io.BytesIO()
    torch.save(p, buffer)
    buffer.seek(0)
    assert is_multiplier(torch.load(buffer, weights_only=False))  # pickling keeps attributes
    named_only = nn.Module()
    named_only.my_multiplier = nn.Parameter(torch.ones(3))  # a name is not a mark
    assert param_groups(named_only)[0]["name"] == "norms_biases"


@pytest.mark.parametrize("cls", [LMD, MPlusAdam, Madam, torch.optim.AdamW])
def test_groups_feed_every_optimizer(cls):
    model = Tiny()
    opt = cls(param_groups(model))
    x = torch.randint(0, 32, (4,))
    loss = model.head(torch.relu(model.fc(model.norm(model.wte(x)))) * model.row).sum()
    loss.backward()
    opt.step()
    if cls is not torch.optim.AdamW:
        assert opt.state[model.wte.weight]["adamw"] and not opt.state[model.fc.weight]["adamw"]
        assert opt.state[model.row]["adamw"]


def test_multiplied_embedding_stays_an_embedding_and_multipliers_get_their_lr():
    from litgpt import GPT, Config

    from lightning_lowprec.multipliers import add_multipliers

    gpt = GPT(Config.from_name("pythia-14m", n_layer=1, vocab_size=256, padded_vocab_size=256))
    add_multipliers(gpt, placement="paper")
    groups = {g["name"]: g for g in param_groups(gpt, lr=1e-3, multiplier_lr_ratio=3.0)}
    stored_wte = gpt.transformer.wte.parametrizations.weight.original
    assert any(p is stored_wte for p in groups["embeddings"]["params"])
    assert not any(p is stored_wte for p in groups["matrices"]["params"])
    assert groups["multipliers"]["lr"] == pytest.approx(3e-3)
    assert groups["multipliers"]["weight_decay"] == 2e-3
    assert {g["lr"] for n, g in groups.items() if n != "multipliers"} == {1e-3}
    with pytest.raises(ValueError, match="multiplier_lr_ratio"):
        param_groups(gpt, multiplier_lr_ratio=3.0)
    with pytest.raises(ValueError, match="Invalid lr"):
        param_groups(gpt, lr=0.0)
