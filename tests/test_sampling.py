"""The plugin's posterior sampler on the paths a demanding user takes (issue 16's eight cases).

Each test is one case of the issue; every one of them failed before the sampler
(``lightning_lowprec.sampling``) replaced the plugin's scattered sampling logic. The model is
the 2-layer litgpt GPT of ``conftest``, trained by LMD for a step or two.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import GPTModule, TokenWindows, make_gpt, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from test_posterior import LMDModule, assert_at_rest, cross_entropy, point_estimate
from torch.utils.data import DataLoader

from lightning_lowprec import LMD, LowPrecision, LowPrecisionPlugin, QuantizedLinear
from lightning_lowprec.callbacks import MergeMultipliers, NormMonitor
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim.groups import param_groups

FMT = "mxfp6_e2m3"
QKV = "transformer.h.0.attn.qkv.weight"


def fabric_gpt(seed: int = 0, **plugin_kwargs):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT, **plugin_kwargs)])
    gpt = make_gpt(seed)
    model, opt = fabric.setup(gpt, LMD(gpt.parameters(), seed=seed))
    return fabric, gpt, model, opt


def train_one_step(fabric, model, opt, inputs) -> None:
    fabric.backward(cross_entropy(model(inputs), inputs))
    opt.step()
    opt.zero_grad()


# -- 1. Trainer: an error in on_before_backward or in the backward --------------------------


class FailsAroundBackward(LMDModule):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def on_before_backward(self, loss):
        if self.trainer.global_step == 1:
            if self.where == "on_before_backward":
                raise ValueError("user error in on_before_backward")
            loss.register_hook(self.fail)

    @staticmethod
    def fail(grad):
        raise ValueError("user error in backward")


@pytest.mark.parametrize("where", ["on_before_backward", "backward"])
def test_an_error_around_the_backward_stays_the_users_and_the_checkpoint_is_saved(
    where, loader, tmp_path
):
    module = FailsAroundBackward(where)
    trainer = L.Trainer(**trainer_kwargs(
        max_steps=3,
        enable_checkpointing=True,
        plugins=[LowPrecisionPlugin(FMT)],
        callbacks=[OnExceptionCheckpoint(tmp_path)],
    ))
    with pytest.raises(ValueError, match=f"user error in {where}$"):
        trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert_at_rest(opt)
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["gpt." + QKV], dict(module.named_parameters())["gpt." + QKV])


# -- 2. Fabric: a training forward without fabric.backward ----------------------------------


def test_fabric_state_dict_and_save_after_a_forward_without_backward_hold_the_point_estimate(
    tokens, tmp_path
):
    fabric, gpt, model, opt = fabric_gpt()
    inputs = tokens[:64].view(1, 64)
    train_one_step(fabric, model, opt, inputs)
    model(inputs)  # e.g. a NaN loss the loop skips: no backward
    assert opt.holds_sample
    qkv = gpt.transformer.h[0].attn.qkv.weight
    sample = qkv.detach().clone()
    expected = point_estimate(opt, qkv)
    assert not torch.equal(sample, expected)

    assert torch.equal(model.state_dict()[QKV], expected)
    fabric.save(tmp_path / "state.ckpt", {"model": model})
    assert torch.equal(torch.load(tmp_path / "state.ckpt")["model"][QKV], expected)
    # Reading the state changed nothing: the parameters still hold the same sample.
    assert opt.holds_sample and torch.equal(qkv, sample)


# -- 3. Fabric: an eval module next to a training one ---------------------------------------


def test_fabric_eval_forward_of_one_module_is_unsampled_while_another_trains(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    generator_gpt, critic_gpt = make_gpt(0), make_gpt(1)
    generator, g_opt = fabric.setup(generator_gpt, LMD(generator_gpt.parameters(), seed=0))
    critic, c_opt = fabric.setup(critic_gpt, LMD(critic_gpt.parameters(), seed=1))
    inputs = tokens[:64].view(1, 64)
    train_one_step(fabric, generator, g_opt, inputs)  # medians away from the weights
    generator.eval()
    critic.train()
    at_rest = generator(inputs)
    assert not g_opt.holds_sample
    critic(inputs)
    assert c_opt.holds_sample
    assert torch.equal(generator(inputs), at_rest) and not g_opt.holds_sample


# -- 4. An optimizer rebuilt while an LR scheduler holds the old one ------------------------


def test_an_optimizer_rebuilt_while_a_scheduler_holds_the_old_one_trains(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    gpt = make_gpt()
    old = LMD(gpt.parameters(), seed=0)
    scheduler = torch.optim.lr_scheduler.StepLR(old, step_size=1)  # keeps `old` alive
    model, opt = fabric.setup(gpt, LMD(gpt.parameters(), seed=1))
    inputs = tokens[:64].view(1, 64)
    train_one_step(fabric, model, opt, inputs)
    model(inputs)
    assert opt.holds_sample and not old.holds_sample
    assert scheduler.optimizer is old


# -- 5. The Trainer's plugin given to Fabric ------------------------------------------------


def test_the_trainer_plugin_given_to_fabric_names_the_fabric_plugin():
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecisionPlugin(FMT)])
    gpt = make_gpt()
    with pytest.raises(ValueError, match=r"With Fabric use LowPrecision: L.Fabric\(plugins="):
        fabric.setup(gpt, LMD(gpt.parameters()))


# -- 6. The autocast device follows the model, not torch.cuda.is_available() ---------------


@pytest.mark.parametrize("front_end", ["fabric", "trainer"])
def test_autocast_runs_on_the_models_device_on_a_gpu_machine_told_to_use_the_cpu(
    front_end, tokens, loader, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plugin_cls = LowPrecision if front_end == "fabric" else LowPrecisionPlugin
    plugin = plugin_cls(FMT, autocast="bf16")
    monkeypatch.undo()
    seen = []

    def record(layer, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype))

    inputs = tokens[:64].view(1, 64)
    if front_end == "fabric":
        fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        gpt = make_gpt()
        model = fabric.setup(gpt)
        gpt.transformer.h[0].attn.qkv.register_forward_hook(record)
        model(inputs)
    else:
        module = GPTModule()
        module.gpt.transformer.h[0].attn.qkv.register_forward_hook(record)
        trainer = L.Trainer(**trainer_kwargs(max_steps=1, plugins=[plugin]))
        trainer.fit(module, loader)
    assert seen and all(enabled for enabled, _ in seen)


# -- 7. Resuming a merged checkpoint without MergeMultipliers -------------------------------


class MultipliedLMD(GPTModule):
    def __init__(self) -> None:
        super().__init__()
        add_multipliers(self.gpt, "paper")

    def configure_optimizers(self):
        return LMD(param_groups(self.gpt), seed=3)


def fit_multiplied(tokens, steps: int, ckpt_path=None, callbacks=()) -> MultipliedLMD:
    module = MultipliedLMD()
    trainer = L.Trainer(**trainer_kwargs(
        max_steps=steps,
        enable_checkpointing=bool(callbacks),
        plugins=[LowPrecisionPlugin(FMT)],
        callbacks=list(callbacks),
    ))
    trainer.fit(module, DataLoader(TokenWindows(tokens, 16), batch_size=4), ckpt_path=ckpt_path)
    return module


def test_a_merged_checkpoint_resumes_exactly_without_merge_multipliers(tokens, tmp_path):
    fit_multiplied(tokens, steps=2, callbacks=[
        MergeMultipliers(), ModelCheckpoint(dirpath=tmp_path, save_last=True),
    ])
    exact = fit_multiplied(tokens, steps=3, ckpt_path=tmp_path / "last.ckpt", callbacks=[
        MergeMultipliers(), ModelCheckpoint(dirpath=tmp_path / "again"),
    ])
    with pytest.warns(UserWarning, match="no MergeMultipliers callback; the plugin un-merged"):
        resumed = fit_multiplied(tokens, steps=3, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.losses == exact.losses
    expected = exact.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


# -- 8. NormMonitor: manual optimisation with two optimizers --------------------------------


class TwoOptimizers(GPTModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        head = list(self.gpt.lm_head.parameters())
        body = [p for p in self.gpt.parameters() if all(p is not q for q in head)]
        return LMD(body, seed=0), torch.optim.AdamW(head, lr=1e-3)

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        grads = [p.grad.detach().clone() for p in self.gpt.parameters()]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.double()) for g in grads]
        )).item())
        for opt in self.optimizers():
            opt.step()
        self.log("train_loss", loss)


def test_norm_monitor_logs_manual_optimisation_with_two_optimizers_at_the_loggers_step(
    tokens, loader, tmp_path
):
    module = TwoOptimizers()
    module.grad_norms = []
    logger = CSVLogger(tmp_path, name="", version="run")
    trainer = L.Trainer(**trainer_kwargs(
        max_steps=8,  # global_step counts both optimizers: 4 batches
        logger=logger,
        log_every_n_steps=1,
        plugins=[LowPrecisionPlugin(FMT)],
        callbacks=[NormMonitor(every_n_steps=2)],
    ))
    trainer.fit(module, loader)
    assert isinstance(module.gpt.transformer.h[0].attn.qkv, QuantizedLinear)
    logger.save()
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    grad_steps = {int(r["step"]): float(r["norm/grad/global"]) for r in rows
                  if r.get("norm/grad/global")}
    loss_steps = {int(r["step"]) for r in rows if r.get("train_loss")}
    assert sorted(grad_steps) == [2, 4]
    assert loss_steps == {0, 1, 2, 3}  # Lightning's own step counter: one per batch
    # The gradient norm is over both optimizers' parameters (the head's included); the
    # monitor sums squares in float64, so the reference does too.
    for step, norm in grad_steps.items():
        assert norm == pytest.approx(module.grad_norms[step - 1], rel=1e-5)


# -- what the sampler's hooks must not break -------------------------------------------------


def test_a_copy_of_a_set_up_model_is_never_sampled_and_the_model_pickles(tokens):
    """A teacher or EMA copy (``copy.deepcopy``) owns no optimizer; a set-up model pickles
    (``torch.save(model)``), and the unpickled one is tied to no optimizer either."""
    import copy
    import io

    fabric, gpt, model, opt = fabric_gpt()
    inputs = tokens[:64].view(1, 64)
    train_one_step(fabric, model, opt, inputs)
    teacher = copy.deepcopy(gpt)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    teacher(inputs)
    assert not opt.holds_sample
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    buffer = io.BytesIO()
    torch.save(gpt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.train()
    loaded(inputs)
    assert not opt.holds_sample
