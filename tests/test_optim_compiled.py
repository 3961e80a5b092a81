"""The default ``compiled="auto"``: compiled kernels where torch.compile works, the eager ones
with one warning elsewhere, no recompilation for new learning rates or shapes."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import make_gpt

from lightning_lowprec import LMD, Madam, MPlusAdam
from lightning_lowprec.optim import base

OPTIMIZERS = [LMD, MPlusAdam, Madam]


def build(cls, params, **kwargs):
    return cls(params, **kwargs) if cls is Madam else cls(params, **{"seed": 3, **kwargs})


def gpt_steps(cls, steps=3, **kwargs):
    """``steps`` steps of ``cls`` training a LitGPT model on fixed tokens (LMD at samples)."""
    model = make_gpt()
    opt = build(cls, model.parameters(), **kwargs)
    tokens = torch.randint(0, 4096, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []

    def forward_backward():
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss

    for _ in range(steps):
        if isinstance(opt, LMD):
            with opt.sampled_params():
                loss = forward_backward()
        else:
            loss = forward_backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.slow
@pytest.mark.auto_compile
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_default_compiles_on_a_gpt_and_matches_the_eager_kernels(cls, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_lowprec.optim"):
        model, opt, losses = gpt_steps(cls)
    assert base.compile_works(torch.device("cpu"))
    assert base.use_compiled(opt.param_groups[0], torch.device("cpu"))
    assert f"{cls.__name__}: the first compiled step took" in caplog.text
    assert caplog.text.count("first compiled step") == 1  # once per optimizer
    eager_model, _, eager_losses = gpt_steps(cls, compiled=False)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    # Matrices only: the inline exponentials differ from torch.exp by ulps, and Adam's
    # normalisation turns ulps in the near-zero gradients of fresh biases into visible ones.
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        if p.ndim >= 2:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.auto_compile
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_no_recompilation_for_a_schedule_or_new_shapes(cls):
    g = torch.Generator().manual_seed(0)

    def params(*shapes):
        return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]

    def step(opt):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
        if isinstance(opt, LMD):
            opt.sample_()
        opt.step()

    opt = build(cls, params((256, 384), (512, 256), (64,)))
    step(opt)  # compiles
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            step(opt)
            schedule.step()
        for group in opt.param_groups:
            group["lr"] *= 0.5
        step(opt)
        step(build(cls, params((300, 1000), (1024, 96), (7, 5, 4096), (10,))))


def test_fallback_warns_once_names_the_reason_and_runs_the_eager_kernels(monkeypatch):
    monkeypatch.setenv(base.COMPILE_ENV, "1")
    monkeypatch.setattr(base, "_COMPILE_WORKS", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("auto", "auto", False):
            params = [torch.nn.Parameter(torch.randn(300, 300, generator=torch.Generator()
                                                     .manual_seed(0)))]
            opt = LMD(params, seed=0, compiled=mode)
            params[0].grad = torch.ones_like(params[0])
            opt.sample_()
            opt.step()
            results.append(params[0].detach().clone())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "torch.compile does not work on cpu (RuntimeError: no C++ compiler found)" in messages[0]
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[2])


def test_environment_variable_turns_auto_off_without_a_probe(monkeypatch):
    monkeypatch.setenv(base.COMPILE_ENV, "0")
    monkeypatch.setattr(base, "_COMPILE_WORKS", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("probed"))
    group = {"compiled": "auto", "foreach": None}
    assert not base.use_compiled(group, torch.device("cpu"))
    assert base.use_compiled({**group, "compiled": True}, torch.device("cpu"))


def test_foreach_default_follows_torchs_rule(monkeypatch):
    monkeypatch.setenv(base.COMPILE_ENV, "0")
    eager = {"compiled": False, "foreach": None}
    assert not base.use_foreach(eager, torch.device("cpu"))  # per tensor: lower peak memory
    assert base.use_foreach(eager, torch.device("cuda"))
    assert base.use_foreach({**eager, "compiled": True}, torch.device("cpu"))  # small tensors
    assert not base.use_foreach({**eager, "foreach": False}, torch.device("cuda"))


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("value", ["yes", None, 1, "Auto"])
def test_invalid_compiled_lists_the_choices(cls, value):
    with pytest.raises(ValueError, match=r"expected True, False or 'auto'") as info:
        cls([torch.nn.Parameter(torch.ones(2, 2))], compiled=value)
    assert f"Invalid compiled: {value!r}" in str(info.value)


def _scale_in_place(p: torch.Tensor, *, k: int) -> None:
    p.mul_(k)


@pytest.mark.auto_compile
def test_a_kernel_builds_more_graphs_than_dynamos_default_limit():
    """Each static flag value is one more graph; a process that meets more than Dynamo's
    default 8 (bf16 and fp32 parameters, several storages and optimizers: the test suite
    does) must keep compiling, which under ``fullgraph=True`` it otherwise fails to do."""
    kernel = base.compiled(_scale_in_place)
    p = torch.ones(4)
    variants = torch._dynamo.config.recompile_limit + 2
    assert variants <= base.RECOMPILE_LIMIT
    for k in range(1, variants + 1):
        kernel(p, k=k)
    assert torch.equal(p, torch.full((4,), float(torch.arange(1, variants + 1).prod())))
