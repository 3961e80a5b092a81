"""posterior_predict: draws from LMD's posterior, averaged probabilities, nothing leaks."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_gpt
from torch import nn

from lightning_lowprec import LMD, LowPrecision, quantize, quantize_linears
from lightning_lowprec.predictive import posterior_predict


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, optimizer: LMD, steps: int = 2) -> None:
    """A few LMD steps at posterior samples (the closure runs at this step's sample)."""
    x = tokens(1)
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            return loss
        optimizer.step(closure)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def trained():
    gpt = make_gpt()
    optimizer = LMD(gpt.parameters(), lr=0.03, sigma=0.1, seed=3)
    train(gpt, optimizer)
    return gpt, optimizer


def test_average_of_sample_probabilities_and_point_estimate_restored(trained):
    gpt, optimizer = trained
    before = snapshot(gpt)
    probs = posterior_predict(gpt, optimizer, tokens(), samples=4)
    assert same(snapshot(gpt), before) and not optimizer.holds_sample and gpt.training
    assert probs.shape == (2, 32, 4096) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 32))
    with torch.no_grad():
        point = torch.softmax(gpt(tokens()), -1)
    assert (probs - point).abs().max() > 1e-4  # the samples are not the point estimate
    # Reproducible, and S=4 is the mean of the first four single draws' probabilities.
    assert torch.equal(posterior_predict(gpt, optimizer, tokens(), samples=4), probs)
    singles = []
    for k in range(4):
        optimizer.sample_(draw=k)
        with torch.no_grad():
            singles.append(torch.softmax(gpt(tokens()), -1))
        optimizer.restore_()
    torch.testing.assert_close(probs, torch.stack(singles).mean(0), rtol=0, atol=1e-6)
    assert not torch.equal(singles[0], singles[1])


def test_draws_follow_the_lmd_posterior():
    """Standardised by the log-normal mean and variance of ``m+ e^{s xi+} - m- e^{s xi-}``,
    the draws of 65k weights have mean 0 and variance 1 (exact normals: box_muller)."""
    layer = nn.Linear(256, 256, bias=False)
    sigma = 0.4
    optimizer = LMD(layer.parameters(), sigma=sigma, noise="box_muller", seed=0)
    optimizer.sample_()  # creates the state (log-medians) at the first use
    optimizer.restore_()
    (_, medians), = optimizer.log_medians()
    m_pos, m_neg = medians.pos.exp(), medians.neg.exp()
    a = math.exp(sigma**2 / 2)
    mean = a * (m_pos - m_neg)
    std = (math.exp(sigma**2) * (math.exp(sigma**2) - 1) * (m_pos**2 + m_neg**2)).sqrt()
    draws = []
    for k in range(3):
        optimizer.sample_(draw=k)
        draws.append(layer.weight.detach().clone())
        optimizer.restore_()
    for z in ((d - mean) / std for d in draws):
        assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1) < 0.03
    # Independent draws: their residuals are uncorrelated.
    r0, r1 = ((d - mean) / std for d in draws[:2])
    assert abs((r0 * r1).mean().item()) < 0.02


def test_predicting_leaves_training_unchanged():
    """Draws are keyed apart from the training noise: a run that predicts between steps trains
    bit for bit like one that does not."""
    runs = []
    for predict in (False, True):
        gpt = make_gpt()
        optimizer = LMD(gpt.parameters(), lr=0.03, sigma=0.1, seed=3, separate_momentum=True)
        train(gpt, optimizer, steps=1)
        if predict:
            posterior_predict(gpt, optimizer, tokens(), samples=2)
        train(gpt, optimizer, steps=2)
        runs.append(snapshot(gpt))
    assert same(*runs)


def test_quantized_model_predicts_from_quantized_samples(trained):
    gpt, optimizer = trained
    fp32 = posterior_predict(gpt, optimizer, tokens(), samples=2)
    quantize_linears(gpt, "mxfp4_e2m1")
    probs = posterior_predict(gpt, optimizer, tokens(), samples=2)
    assert (probs - fp32).abs().max() > 1e-5  # probabilities near 1/4096: the random init
    # Reference: the first draw's weights, quantized by hand in a plain copy of the model.
    optimizer.sample_(draw=0)
    plain = make_gpt()
    plain.load_state_dict(gpt.state_dict())
    optimizer.restore_()
    optimizer.sample_(draw=1)
    second = make_gpt()
    second.load_state_dict(gpt.state_dict())
    optimizer.restore_()
    expected = []
    for model in (plain, second):
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.data = quantize(module.weight.data, "mxfp4_e2m1")
                module.register_forward_pre_hook(
                    lambda m, args: (quantize(args[0], "mxfp4_e2m1"),))
        with torch.no_grad():
            expected.append(torch.softmax(model(tokens()), -1))
    torch.testing.assert_close(probs, torch.stack(expected).mean(0), rtol=0, atol=1e-6)


def test_restores_the_point_estimate_when_the_forward_raises(trained):
    gpt, optimizer = trained
    before = snapshot(gpt)
    calls = []

    def fail_on_second(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = gpt.register_forward_pre_hook(fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        posterior_predict(gpt, optimizer, tokens(), samples=4)
    handle.remove()
    assert same(snapshot(gpt), before) and not optimizer.holds_sample


def test_from_a_state_dict_and_under_fabric(trained):
    gpt, optimizer = trained
    expected = posterior_predict(gpt, optimizer, tokens(), samples=3)
    assert torch.equal(posterior_predict(gpt, optimizer.state_dict(), tokens(), samples=3),
                       expected)

    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision("mxfp6_e2m3")])
    model = make_gpt()
    lmd = LMD(model.parameters(), lr=0.03, sigma=0.1, seed=3)
    model, lmd = fabric.setup(model, lmd)
    x = tokens(1)
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    fabric.backward(loss)
    lmd.step()
    before = snapshot(model)
    probs = posterior_predict(model, lmd, tokens(), samples=2)
    assert same(snapshot(model), before)
    with torch.no_grad():
        point = torch.softmax(model(tokens()), -1)
    assert (probs - point).abs().max() > 1e-4


def test_bad_arguments(trained):
    gpt, optimizer = trained
    with pytest.raises(ValueError, match="samples must be an integer >= 1, got 0"):
        posterior_predict(gpt, optimizer, tokens(), samples=0)
    with pytest.raises(ValueError, match="AdamW offers no predictive posterior draws"):
        posterior_predict(gpt, torch.optim.AdamW(gpt.parameters()), tokens())
    with pytest.raises(ValueError, match="does not fit LMD"):
        posterior_predict(gpt, {"state": {}, "param_groups": []}, tokens())
    with pytest.raises(ValueError, match="draw must be None or an integer >= 0"):
        optimizer.sample_(draw=-1)
    optimizer.sample_()
    with pytest.raises(ValueError, match="hold a training sample"):
        posterior_predict(gpt, optimizer, tokens())
    optimizer.restore_()
