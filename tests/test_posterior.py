"""Posterior sampling through the plugin: LMD under an MX forward in Trainer and Fabric.

What every test here holds the plugin to (the contract in DESIGN.md): each training forward and
its backward run at this optimizer step's sample of the posterior (the same one for every
micro-batch of the step), LMD updates from the gradient at that sample, and at rest (between
steps, in validation, in checkpoints, after fit, after an exception) the parameters hold the
point estimate ``m+ - m-``. Runs are a handful of steps of the 2-layer litgpt GPT.
"""

from __future__ import annotations

import copy
import itertools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import GPTModule, TokenWindows, make_gpt, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lowprec import (
    LMD,
    LowPrecision,
    LowPrecisionPlugin,
    Madam,
    MPlusAdam,
    QuantizedLinear,
    quantize_linears,
)

FMT = "mxfp6_e2m3"


# --------------------------------------------------------------------------------------------
# What the parameters hold
# --------------------------------------------------------------------------------------------


def sampled_params(opt: LMD) -> list[Tensor]:
    """The parameters LMD samples: those with log-medians (1-D ones take its AdamW rule)."""
    return [
        p
        for group in opt.param_groups
        for p in group["params"]
        if p in opt.state and not opt.state[p]["adamw"]
    ]


def point_estimate(opt: LMD, p: Tensor) -> Tensor:
    state = opt.state[p]
    return state["log_median_pos"].exp() - state["log_median_neg"].exp()


def assert_at_rest(opt: LMD) -> None:
    """No sample is held and every sampled parameter equals its point estimate, bit for bit."""
    assert not opt.holds_sample
    for p in sampled_params(opt):
        assert torch.equal(p, point_estimate(opt, p))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class LMDModule(GPTModule):
    """The conftest GPT trained by LMD; records what each ``training_step`` sees."""

    def __init__(self, seed: int = 0, lmd_seed: int | None = 7) -> None:
        super().__init__(seed)
        self.lmd_seed = lmd_seed
        self.seen: list[dict] = []

    def configure_optimizers(self):
        return LMD(self.parameters(), seed=self.lmd_seed)

    def training_step(self, batch, batch_idx):
        self.record(batch)
        return super().training_step(batch, batch_idx)

    def record(self, batch) -> None:
        opt = self.trainer.optimizers[0]
        self.seen.append(
            {
                "step": self.trainer.global_step,
                "held": opt.holds_sample,
                "weights": snapshot(self.gpt),
                "point": {id(p): point_estimate(opt, p) for p in sampled_params(opt)},
                "batch": [t.clone() for t in batch],
            }
        )


def reference_gradients(module: LMDModule, records: list[dict]) -> dict[str, Tensor]:
    """dloss/dtheta at the recorded weights, on the recorded micro-batches, built by hand."""
    model = copy.deepcopy(module.gpt)  # keeps the QuantizedLinear layers and their settings
    model.load_state_dict(records[0]["weights"])
    model.zero_grad(set_to_none=True)
    for record in records:
        inputs, targets = record["batch"]
        (cross_entropy(model(inputs), targets) / len(records)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


class AtRest(Callback):
    """Checks the point estimate wherever Lightning lets other code look at the weights, and
    that the gradient LMD steps with is the gradient at the step's sample."""

    def __init__(self) -> None:
        self.checks: dict[str, int] = {}
        self.gradient_checks = 0

    def check(self, trainer: L.Trainer, where: str) -> None:
        if trainer.optimizers:
            assert_at_rest(trainer.optimizers[0])
        self.checks[where] = self.checks.get(where, 0) + 1

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.check(trainer, "train_batch_start")

    def on_after_backward(self, trainer, module):
        if module.automatic_optimization:
            self.check(trainer, "after_backward")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if module.automatic_optimization:  # (manual: inside training_step, at the sample)
            self.check(trainer, "before_optimizer_step")
        records = [r for r in module.seen if r["step"] == trainer.global_step]
        expected = reference_gradients(module, records)
        for name, p in module.gpt.named_parameters():
            assert torch.equal(p.grad, expected[name]), name
        self.gradient_checks += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.check(trainer, "train_batch_end")

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.check(trainer, "validation")

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.check(trainer, "save_checkpoint")

    def on_train_end(self, trainer, module):
        self.check(trainer, "train_end")


def assert_sampled_per_step(module: LMDModule, micro_batches: int) -> None:
    """Every training_step ran at a sample, shared within a step and fresh for each step."""
    steps = sorted({r["step"] for r in module.seen})
    assert len(module.seen) == micro_batches * len(steps)
    firsts = []
    for step in steps:
        records = [r for r in module.seen if r["step"] == step]
        assert all(r["held"] for r in records)
        for record in records[1:]:
            assert_same_weights(record["weights"], records[0]["weights"])
        firsts.append(records[0])
    qkv = "transformer.h.0.attn.qkv.weight"
    for a, b in itertools.pairwise(firsts):
        assert not torch.equal(a["weights"][qkv], b["weights"][qkv])
    opt_param = module.gpt.transformer.h[0].attn.qkv.weight
    for record in firsts:
        sample, point = record["weights"][qkv], record["point"][id(opt_param)]
        assert not torch.equal(sample, point)
        # theta = m+ e^(sigma xi+) - m- e^(sigma xi-): a few percent of the medians away
        assert 0 < (sample - point).abs().mean() < 0.2 * point.abs().mean()


# --------------------------------------------------------------------------------------------
# Trainer, automatic optimisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [FMT, None])
def test_trainer_trains_at_one_sample_per_step_and_rests_at_the_point_estimate(
    fmt, loader, tmp_path
):
    module = LMDModule()
    probe = AtRest()
    trainer = L.Trainer(
        **trainer_kwargs(
            max_steps=3,
            accumulate_grad_batches=2,
            val_check_interval=3,  # after batch 3 (mid-accumulation of step 2) and batch 6
            limit_val_batches=1,
            num_sanity_val_steps=0,
            plugins=[LowPrecisionPlugin(fmt)],
            callbacks=[probe, ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)],
            enable_checkpointing=True,
        )
    )
    trainer.fit(module, loader, loader)

    quantized = [m for m in module.gpt.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == (8 if fmt else 0)
    assert_sampled_per_step(module, micro_batches=2)
    assert probe.gradient_checks == 3
    assert probe.checks == {
        "train_batch_start": 6,
        "after_backward": 6,
        "before_optimizer_step": 3,
        "train_batch_end": 6,
        "validation": 2,
        "save_checkpoint": 3,
        "train_end": 1,
    }
    assert_at_rest(trainer.optimizers[0])  # after fit


def test_validation_loss_equals_the_loss_of_the_model_loaded_from_the_checkpoint(loader, tmp_path):
    module = LMDModule()
    checkpoint = ModelCheckpoint(tmp_path, filename="last")
    trainer = L.Trainer(
        **trainer_kwargs(
            max_steps=4,
            val_check_interval=4,
            limit_val_batches=2,
            num_sanity_val_steps=0,
            plugins=[LowPrecisionPlugin(FMT)],
            callbacks=[checkpoint],
            enable_checkpointing=True,
        )
    )
    trainer.fit(module, loader, loader)
    val_loss = trainer.callback_metrics["val_loss"]
    opt = trainer.optimizers[0]

    loaded = GPTModule(seed=1)
    loaded.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    evaluator = L.Trainer(**trainer_kwargs(limit_val_batches=2, plugins=[LowPrecisionPlugin(FMT)]))
    assert evaluator.validate(loaded, loader, verbose=False)[0]["val_loss"] == val_loss.item()

    # The checkpoint holds the point estimate, not the last sample.
    qkv = loaded.gpt.transformer.h[0].attn.qkv.weight
    trained = module.gpt.transformer.h[0].attn.qkv.weight
    assert torch.equal(qkv, point_estimate(opt, trained))
    assert not torch.equal(qkv, module.seen[-1]["weights"]["transformer.h.0.attn.qkv.weight"])


def test_same_seed_same_run_and_sample_false_trains_at_the_point_estimate(loader):
    def run(sample: bool) -> tuple[LMDModule, dict[str, Tensor]]:
        L.seed_everything(3)
        module = LMDModule(lmd_seed=None)  # LMD draws its seed from the seeded global RNG
        trainer = L.Trainer(
            **trainer_kwargs(max_steps=3, plugins=[LowPrecisionPlugin(FMT, sample=sample)])
        )
        trainer.fit(module, loader)
        return module, snapshot(module.gpt)

    sampled, weights = run(sample=True)
    again, weights_again = run(sample=True)
    assert_same_weights(weights, weights_again)
    assert sampled.losses == again.losses

    at_point, point_weights = run(sample=False)
    assert not any(r["held"] for r in at_point.seen)
    names = {id(p): name for name, p in at_point.gpt.named_parameters()}
    compared = 0
    for record in at_point.seen:  # LMD has medians from its first step on
        for param_id, point in record["point"].items():
            assert torch.equal(record["weights"][names[param_id]], point)
            compared += 1
    assert compared == 2 * 10  # steps 2 and 3, the 10 matrices of the GPT
    qkv = "transformer.h.0.attn.qkv.weight"
    assert not torch.equal(point_weights[qkv], weights[qkv])


def test_trainer_resume_from_a_mid_run_checkpoint_is_bitwise(tokens, tmp_path):
    loader = DataLoader(TokenWindows(tokens, 32), batch_size=8)  # 4 batches: 2 steps an epoch

    def trainer(max_epochs: int, *callbacks: Callback) -> L.Trainer:
        return L.Trainer(
            **trainer_kwargs(
                max_epochs=max_epochs,
                accumulate_grad_batches=2,
                plugins=[LowPrecisionPlugin(FMT)],
                callbacks=list(callbacks),
                enable_checkpointing=bool(callbacks),
            )
        )

    whole = LMDModule()
    saver = ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer(2, saver).fit(whole, loader)
    mid_run = tmp_path / "epoch=0-step=2.ckpt"
    assert mid_run.is_file()

    resumed = LMDModule(seed=1, lmd_seed=99)  # other init and seed: the checkpoint restores both
    trainer(2).fit(resumed, loader, ckpt_path=mid_run)
    assert len(resumed.seen) == 4
    assert_same_weights(snapshot(resumed.gpt), snapshot(whole.gpt))
    assert resumed.losses == whole.losses[4:]


# --------------------------------------------------------------------------------------------
# Trainer, manual optimisation
# --------------------------------------------------------------------------------------------


class ManualLMDModule(LMDModule):
    """Manual optimisation as Lightning's docs write it, accumulating two micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.after_step: list[dict[str, Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.record(batch)
        opt = self.optimizers()
        loss = self.loss(batch)
        self.losses.append(loss.item())
        self.manual_backward(loss / 2)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()
            # The rest of training_step runs at the next step's sample.
            assert opt.optimizer.holds_sample
            self.after_step.append(snapshot(self.gpt))


def test_manual_optimization_samples_like_automatic_and_needs_no_extra_call(loader):
    manual = ManualLMDModule()
    probe = AtRest()
    plugin = LowPrecisionPlugin(FMT)
    L.Trainer(**trainer_kwargs(max_steps=3, plugins=[plugin], callbacks=[probe])).fit(
        manual, loader
    )
    assert_sampled_per_step(manual, micro_batches=2)
    assert probe.gradient_checks == 3
    assert probe.checks["train_batch_end"] == 6  # at rest once training_step has returned
    # What opt.step() drew inside training_step is what the next step's training_step sees.
    entries = [r["weights"] for r in manual.seen if r["step"] > 0][::2]
    for drawn, entry in zip(manual.after_step[:-1], entries, strict=True):
        assert_same_weights(drawn, entry)

    automatic = LMDModule()
    L.Trainer(
        **trainer_kwargs(max_steps=3, accumulate_grad_batches=2, plugins=[LowPrecisionPlugin(FMT)])
    ).fit(automatic, loader)
    assert_same_weights(snapshot(manual.gpt), snapshot(automatic.gpt))


# --------------------------------------------------------------------------------------------
# Fabric
# --------------------------------------------------------------------------------------------


def fabric_run(
    tokens: Tensor,
    steps: int,
    *,
    fmt: str | None = FMT,
    resume_from=None,
    save_to=None,
    save_at: int | None = None,
) -> tuple[nn.Module, LMD, list[float]]:
    """The Fabric loop a user writes, with 2 micro-batches per step; checks the weights as it
    goes. Optionally saves ``{"model", "optimizer", "step"}`` after step ``save_at``, or
    starts from such a file."""
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(fmt)])
    gpt = make_gpt(seed=1 if resume_from else 0)
    model, opt = fabric.setup(gpt, LMD(gpt.parameters(), seed=99 if resume_from else 7))
    start = 0
    if resume_from is not None:
        state = {"model": model, "optimizer": opt, "step": 0}
        fabric.load(resume_from, state)
        start = state["step"]
    batches = list(DataLoader(TokenWindows(tokens, 64), batch_size=8))
    losses = []
    for step in range(start, steps):
        for inputs, targets in batches[2 * step : 2 * step + 2]:
            loss = cross_entropy(model(inputs), targets)
            assert opt.holds_sample  # the training forward drew the step's sample
            fabric.backward(loss / 2)
            assert_at_rest(opt)  # and its backward restored the point estimate
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        assert_at_rest(opt)
        if step + 1 == save_at:
            fabric.save(save_to, {"model": model, "optimizer": opt, "step": step + 1})
    return gpt, opt, losses


def test_fabric_equals_the_trainer_and_evaluates_at_the_point_estimate(tokens, loader):
    gpt, opt, losses = fabric_run(tokens, steps=3)

    module = LMDModule()
    L.Trainer(
        **trainer_kwargs(max_steps=3, accumulate_grad_batches=2, plugins=[LowPrecisionPlugin(FMT)])
    ).fit(module, loader)
    assert losses == module.losses
    assert_same_weights(snapshot(gpt), snapshot(module.gpt))

    # Evaluation forwards (eval mode, or no grad) leave the point estimate in place.
    inputs = next(iter(loader))[0]
    gpt.eval()
    gpt(inputs)
    gpt.train()
    with torch.no_grad():
        gpt(inputs)
    assert_at_rest(opt)


def test_fabric_resume_from_a_mid_run_checkpoint_is_bitwise(tokens, tmp_path):
    path = tmp_path / "step2.ckpt"
    whole, _, losses = fabric_run(tokens, steps=4, save_to=path, save_at=2)
    resumed, _, resumed_losses = fabric_run(tokens, steps=4, resume_from=path)
    assert resumed_losses == losses[4:]
    assert_same_weights(snapshot(resumed), snapshot(whole))


def test_fabric_samples_without_quantization_with_fmt_none(tokens):
    gpt, opt, losses = fabric_run(tokens, steps=2, fmt=None)
    assert not any(isinstance(m, QuantizedLinear) for m in gpt.modules())
    assert len(losses) == 4


# --------------------------------------------------------------------------------------------
# Plain optimizers, errors, exceptions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=3e-3),
        lambda params: MPlusAdam(params),
        lambda params: Madam(params),
    ],
    ids=["AdamW", "MPlusAdam", "Madam"],
)
def test_plain_optimizers_only_get_quantization(make_optimizer, tokens):
    batches = list(DataLoader(TokenWindows(tokens, 24), batch_size=8))

    by_hand = make_gpt()
    quantize_linears(by_hand, FMT)
    opt = make_optimizer(by_hand.parameters())
    for inputs, targets in batches:
        cross_entropy(by_hand(inputs), targets).backward()
        opt.step()
        opt.zero_grad()

    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    gpt = make_gpt()
    model, opt = fabric.setup(gpt, make_optimizer(gpt.parameters()))
    for inputs, targets in batches:
        fabric.backward(cross_entropy(model(inputs), targets))
        opt.step()
        opt.zero_grad()
    assert_same_weights(snapshot(gpt), snapshot(by_hand))


class FailingModule(LMDModule):
    """Raises in step 2, at the sample: in training_step after the forward, or in backward."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.where == "training_step" and batch_idx == 1:
            raise RuntimeError(f"boom in {self.where}")
        return loss

    def on_before_backward(self, loss):
        if self.where == "backward" and self.trainer.global_step == 1:
            assert self.trainer.optimizers[0].holds_sample
            raise RuntimeError(f"boom in {self.where}")


@pytest.mark.parametrize("where", ["training_step", "backward"])
def test_an_exception_leaves_the_point_estimate(where, loader):
    module = FailingModule(where)
    trainer = L.Trainer(**trainer_kwargs(max_steps=3, plugins=[LowPrecisionPlugin(FMT)]))
    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        trainer.fit(module, loader)
    assert trainer.global_step == 1 and module.seen[-1]["held"]
    assert_at_rest(trainer.optimizers[0])


def test_fabric_forward_or_backward_that_raises_leaves_the_point_estimate(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    gpt = make_gpt()
    model, opt = fabric.setup(gpt, LMD(gpt.parameters(), seed=0))
    inputs = tokens[:64].view(1, 64)
    fabric.backward(cross_entropy(model(inputs), inputs))
    opt.step()

    def fail(*_):
        raise RuntimeError("boom")

    handle = gpt.transformer.h[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(inputs)
    assert_at_rest(opt)
    handle.remove()

    loss = cross_entropy(model(inputs), inputs)
    assert opt.holds_sample
    loss.register_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        fabric.backward(loss)
    assert_at_rest(opt)


class SkipsFirstMicroBatch(LMDModule):
    """Returns ``None`` for the first micro-batch: no backward comes to restore after it."""

    def __init__(self) -> None:
        super().__init__()
        self.validated = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 0 else loss

    def validation_step(self, batch, batch_idx):
        assert_at_rest(self.trainer.optimizers[0])
        self.validated += 1
        return super().validation_step(batch, batch_idx)


def test_validation_after_a_skipped_micro_batch_runs_at_the_point_estimate(loader):
    module = SkipsFirstMicroBatch()
    trainer = L.Trainer(
        **trainer_kwargs(
            max_steps=1,
            accumulate_grad_batches=2,
            val_check_interval=1,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            plugins=[LowPrecisionPlugin(FMT)],
        )
    )
    trainer.fit(module, loader, loader)
    assert module.validated == 2 and module.seen[0]["held"]
    assert_at_rest(trainer.optimizers[0])


class SavesInsideTrainingStep(LMDModule):
    def training_step(self, batch, batch_idx):
        self.trainer.save_checkpoint(self.path)
        return super().training_step(batch, batch_idx)


def test_saving_a_checkpoint_at_a_sample_is_refused(loader, tmp_path):
    module = SavesInsideTrainingStep()
    module.path = tmp_path / "inside.ckpt"
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, plugins=[LowPrecisionPlugin(FMT)]))
    with pytest.raises(RuntimeError, match="posterior sample of LMD, not the point estimate"):
        trainer.fit(module, loader)
    assert not module.path.exists()
    assert_at_rest(trainer.optimizers[0])


def test_a_leftover_posterior_optimizer_is_ignored_and_a_partial_one_refused(tokens):
    """The latest posterior optimizer built over a parameter owns it (issue 16, case 4 has
    the scheduler variant); one superseded for only part of its parameters is refused."""
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    gpt = make_gpt()
    leftover = LMD(gpt.parameters())
    model, opt = fabric.setup(gpt, LMD(gpt.parameters()))
    model(tokens[:64].view(1, 64))
    assert opt.holds_sample and not leftover.holds_sample
    partial = LMD(gpt.transformer.h[0].parameters())
    with pytest.raises(RuntimeError, match=r"Two posterior optimizers \(LMD, LMD\) train"):
        model(tokens[:64].view(1, 64))
    del partial
    model(tokens[:64].view(1, 64))
    assert opt.holds_sample


@pytest.mark.parametrize("cls", [LowPrecision, LowPrecisionPlugin])
def test_settings_without_a_format_and_the_sample_switch(cls):
    assert repr(cls()) == f"{cls.__name__}()"
    assert repr(cls(FMT, sample=False)) == f"{cls.__name__}('{FMT}', sample=False)"
    assert cls().state_dict()["w_fmt"] is None and cls(sample=False).state_dict()["sample"] is False
    with pytest.raises(ValueError, match="sample must be True or False, got 'yes'"):
        cls(FMT, sample="yes")
    with pytest.raises(ValueError, match="include and quantize_backward select what to quantize"):
        cls(include="attn")
    with pytest.raises(ValueError, match="No number format given"):
        cls(w_fmt=FMT)


# --------------------------------------------------------------------------------------------
# Gradient accumulation: one sample per optimizer step (LMD's spare buffers)
# --------------------------------------------------------------------------------------------


def old_schedule(monkeypatch) -> None:
    """Every micro-batch recomputes the sample and the point estimate (LMD without spares)."""
    from lightning_lowprec.optim.lmd import LMD as Cls

    monkeypatch.setattr(Cls, "_sample_from_spare", lambda self, p, shard: False)


def count_kernels(monkeypatch) -> dict[str, int]:
    """Count the eager sample and point-estimate kernel calls (one per tensor and call)."""
    from lightning_lowprec.optim import lmd

    counts = {"sample": 0, "point": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(lmd, "_sample_chunked", counting("sample", lmd._sample_chunked))
    monkeypatch.setattr(lmd, "_point_estimate_tensor",
                        counting("point", lmd._point_estimate_tensor))
    return counts


class SeenModule(LMDModule):
    """Records the weights at every training_step and every on_after_backward."""

    def __init__(self, compiled="auto") -> None:
        super().__init__()
        self.compiled = compiled
        self.after_backward: list[dict[str, Tensor]] = []

    def configure_optimizers(self):
        return LMD(self.parameters(), seed=self.lmd_seed, compiled=self.compiled)

    def on_after_backward(self):
        self.after_backward.append(snapshot(self.gpt))


def trainer_run(loader, compiled="auto") -> SeenModule:
    module = SeenModule(compiled)
    L.Trainer(**trainer_kwargs(max_steps=2, accumulate_grad_batches=3,
                               plugins=[LowPrecisionPlugin(FMT)])).fit(module, loader)
    return module


def assert_same_run(new: SeenModule, old: SeenModule) -> None:
    assert new.losses == old.losses
    assert len(new.seen) == len(old.seen) == 6
    for a, b in zip(new.seen, old.seen, strict=True):
        assert_same_weights(a["weights"], b["weights"])
    for a, b in zip(new.after_backward, old.after_backward, strict=True):
        assert_same_weights(a, b)
    assert_same_weights(snapshot(new.gpt), snapshot(old.gpt))


@pytest.mark.parametrize("compiled", ["auto", False])
def test_trainer_accumulation_draws_once_per_step_bitwise_as_before(
    compiled, loader, monkeypatch
):
    new = trainer_run(loader, compiled)
    assert_sampled_per_step(new, micro_batches=3)
    with monkeypatch.context() as m:
        old_schedule(m)
        old = trainer_run(loader, compiled)
    assert_same_run(new, old)
    opt = new.trainer.optimizers[0]
    assert_at_rest(opt)
    for p in sampled_params(opt):  # one spare per sampled tensor, of its dtype and shape
        assert opt._spares[p].buffer.shape == p.shape


def test_trainer_accumulation_costs_one_sample_per_step(loader, monkeypatch):
    counts = count_kernels(monkeypatch)
    module = trainer_run(loader, compiled=False)
    n = len(sampled_params(module.trainer.optimizers[0]))
    # Step 1: the first micro-batch draws and restores; the second redraws once (allocating
    # the spares); step 2 draws once; every other switch is a swap. The old schedule:
    # 6 samples and 6 point estimates per tensor.
    assert counts == {"sample": 3 * n, "point": n}


def test_without_accumulation_no_spare_is_allocated(loader):
    module = SeenModule(compiled=False)
    L.Trainer(**trainer_kwargs(max_steps=3, plugins=[LowPrecisionPlugin(FMT)])).fit(
        module, loader)
    assert module.trainer.optimizers[0]._spares == {}


def fabric_accumulate(
    tokens: Tensor, between=None, steps: int = 2, micro: int = 3
) -> tuple[list[float], list[dict[str, Tensor]], dict[str, Tensor]]:
    """Fabric with ``no_backward_sync`` and ``micro`` micro-batches per step; ``between(model,
    opt)`` runs after each micro-batch's backward but the last. Returns the losses, the
    weights at every forward and the final weights."""
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    gpt = make_gpt(seed=0)
    model, opt = fabric.setup(gpt, LMD(gpt.parameters(), seed=7, compiled=False))
    batches = list(DataLoader(TokenWindows(tokens, 64), batch_size=8))
    losses, seen = [], []
    for step in range(steps):
        for i, (inputs, targets) in enumerate(batches[micro * step: micro * step + micro]):
            last = i == micro - 1
            with fabric.no_backward_sync(model, enabled=not last):
                logits = model(inputs)
                assert opt.holds_sample
                seen.append({n: p.detach().clone() for n, p in gpt.named_parameters()})
                loss = cross_entropy(logits, targets)
                fabric.backward(loss / micro)
            assert_at_rest(opt)
            losses.append(loss.item())
            if between is not None and not last:
                between(model, opt)
        opt.step()
        opt.zero_grad()
    return losses, seen, snapshot(gpt)


def _write(model, opt):
    with torch.no_grad():
        model.transformer.h[0].attn.qkv.weight.mul_(0.5)


def _predict(model, opt):
    opt = opt.optimizer  # Fabric's wrapper would record the draw on itself
    opt.sample_(draw=1)
    opt.restore_()


def _state_dict(model, opt):
    model.state_dict()


@pytest.mark.parametrize("between", [None, _write, _predict, _state_dict],
                         ids=["plain", "user_write", "predictive_draw", "state_dict"])
def test_fabric_accumulation_is_bitwise_as_before_whatever_runs_between(
    between, tokens, monkeypatch
):
    new = fabric_accumulate(tokens, between)
    with monkeypatch.context() as m:
        old_schedule(m)
        old = fabric_accumulate(tokens, between)
    assert new[0] == old[0]
    for a, b in zip(new[1], old[1], strict=True):
        assert_same_weights(a, b)
    assert_same_weights(new[2], old[2])
    if between is _write:  # the write was adopted: the next sample follows the new medians
        qkv = "transformer.h.0.attn.qkv.weight"
        assert not torch.equal(new[1][1][qkv], new[1][0][qkv])


def test_fabric_accumulation_costs_one_sample_per_step(tokens, monkeypatch):
    counts = count_kernels(monkeypatch)
    fabric_accumulate(tokens)
    n = 8 + 2  # the 2-layer GPT's matrices (4 per block) and the embedding and head
    assert counts == {"sample": 3 * n, "point": n}


def test_a_write_to_the_sample_is_not_kept_for_the_next_micro_batch(tokens, monkeypatch):
    """A write into the parameters while they hold the sample (inside the step) is not
    swapped into the spare: the next micro-batch gets the step's sample again."""

    def write_at_sample(model, opt):
        opt = opt.optimizer
        opt.sample_()
        with torch.no_grad():
            model.transformer.h[0].attn.qkv.weight.add_(1.0)
        opt.restore_()

    new = fabric_accumulate(tokens, write_at_sample)
    with monkeypatch.context() as m:
        old_schedule(m)
        old = fabric_accumulate(tokens, write_at_sample)
    for a, b in zip(new[1], old[1], strict=True):
        assert_same_weights(a, b)
    assert_same_weights(new[2], old[2])
