"""Non-finite gradients are not skipped in silence (issue 20): a rate-limited warning names
the parameters, and ``nonfinite="raise"`` stops before any weight or state changes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_lowprec import LMD, Madam, MPlusAdam
from lightning_lowprec.optim import param_groups

CLASSES = [LMD, MPlusAdam, Madam]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 2))


def fill_grads(net: torch.nn.Module, bad: str | None = None) -> None:
    for name, p in net.named_parameters():
        p.grad = torch.randn_like(p)
        if name == bad:
            p.grad.view(-1)[0] = float("nan")


def skip_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "skipped the update" in str(w.message)]


@pytest.mark.parametrize("cls", CLASSES)
def test_skip_warns_with_the_parameter_name_and_is_rate_limited(cls):
    net = model()
    opt = cls(net.named_parameters(), seed=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(25):
            fill_grads(net, bad="2.weight")
            if step == 3:
                net[0].bias.grad[1] = float("inf")
            opt.step()
    messages = skip_warnings(record)
    assert len(messages) == 2  # at the 1st and the 10th step with a skip, not 25 times
    assert "'2.weight' (shape (2, 8))" in messages[0] and "'0.bias'" not in messages[0]
    assert "Steps with skips so far: 10 (11 skipped updates" in messages[1]
    assert opt.skipped_steps == 26


@pytest.mark.parametrize("cls", CLASSES)
def test_unnamed_parameters_are_named_by_group_position_and_shape(cls):
    net = model()
    opt = cls(param_groups(net, weight_decay=0.0) + [], seed=0)
    with pytest.warns(RuntimeWarning, match=r"group 1 \('norms_biases'\) parameter 1 "
                                            r"\(shape \(8,\)\)"):
        fill_grads(net, bad="1.weight")  # LayerNorm weight: second of the 1-D group
        opt.step()
    opt = cls(list(net.parameters()), seed=0)
    with pytest.warns(RuntimeWarning, match=r"group 0 parameter 4 \(shape \(2, 8\)\)"):
        fill_grads(net, bad="2.weight")
        opt.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_raise_names_the_parameter_before_any_change(cls):
    net = model()
    opt = cls(net.named_parameters(), seed=0, nonfinite="raise")
    fill_grads(net)
    opt.step()
    weights = copy.deepcopy(net.state_dict())
    state = copy.deepcopy(opt.state_dict())
    fill_grads(net, bad="0.bias")
    with pytest.raises(FloatingPointError, match=r"gradient of '0.bias' \(shape \(8,\)\) is "
                                                 r"not finite.*nonfinite='raise'"):
        opt.step()
    for key, value in net.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for i, entries in state["state"].items():
        for key, value in entries.items():
            same = torch.equal(value, after["state"][i][key]) if torch.is_tensor(value) else (
                value == after["state"][i][key])
            assert same, (i, key)
    fresh = cls(model().parameters(), nonfinite="raise", seed=0)  # no state is created either
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError, match="group 0 parameter 0"):
        fresh.step()
    assert len(fresh.state) == 0


def test_lmd_raise_inside_a_closure_step_restores_the_point_estimate():
    net = model()
    opt = LMD(net.parameters(), seed=0, sigma=0.5, nonfinite="raise")
    fill_grads(net)
    opt.step()
    point = [p.detach().clone() for p in net.parameters()]

    def closure():
        loss = net(torch.randn(4, 8)).sum() * float("nan")
        loss.backward()
        return loss

    opt.zero_grad()
    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert not opt.holds_sample
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), point, strict=True))


@pytest.mark.parametrize("cls", CLASSES)
def test_invalid_nonfinite_names_the_choices(cls):
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'ignore'; expected one of "
                                         r"\('skip', 'raise'\)"):
        cls(model().parameters(), nonfinite="ignore")


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_without_the_option_loads(cls):
    """A state dict saved before ``nonfinite`` existed gets the constructor's value."""
    net = model()
    opt = cls(net.parameters(), seed=0)
    fill_grads(net)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["nonfinite"]
    opt2 = cls(net.parameters(), seed=0, nonfinite="raise")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["nonfinite"] == "raise"
