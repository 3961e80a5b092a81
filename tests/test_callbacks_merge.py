"""MergeMultipliers / FabricMergeMultipliers: merged checkpoints that load strictly and resume
exactly, in the Trainer and in Fabric."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from conftest import GPTModule, TokenWindows, make_gpt, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lowprec import LowPrecisionPlugin, QuantizedLinear, quantize_linears
from lightning_lowprec.callbacks import (
    FACTORS_KEY,
    FabricMergeMultipliers,
    MergedCheckpointIO,
    MergeMultipliers,
    merge_checkpoint,
)
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim.groups import is_multiplier, param_groups

FMT = "mxfp6_e2m3"


class MultipliedGPT(GPTModule):
    """The shared test GPT with the paper's multipliers and their own parameter group."""

    def __init__(self, seed: int = 0, lr: float = 3e-3) -> None:
        super().__init__(seed, lr)
        add_multipliers(self.gpt, "paper")

    def configure_optimizers(self):
        return torch.optim.AdamW(param_groups(self.gpt), lr=self.lr)


def fit(tmp_path, tokens, epochs: int, ckpt_path=None, **kwargs) -> MultipliedGPT:
    """Train 2 batches per epoch; ModelCheckpoint writes ``tmp_path/last.ckpt``."""
    module = MultipliedGPT()
    trainer = L.Trainer(
        **trainer_kwargs(
            max_epochs=epochs,
            limit_train_batches=2,
            enable_checkpointing=True,
            callbacks=[MergeMultipliers(), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            **kwargs,
        )
    )
    loader = DataLoader(TokenWindows(tokens, 16), batch_size=4)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def gpt_state(checkpoint: dict) -> dict:
    return {k.removeprefix("gpt."): v for k, v in checkpoint["state_dict"].items()}


def test_a_trainer_checkpoint_loads_into_a_plain_gpt_strictly(tmp_path, tokens):
    module = fit(tmp_path, tokens, epochs=1)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any("parametrizations" in key for key in checkpoint["state_dict"])
    assert set(checkpoint[FACTORS_KEY]) == {"state_dict"}
    plain = make_gpt(seed=7)
    plain.load_state_dict(gpt_state(checkpoint), strict=True)
    x = tokens[:64].reshape(2, 32)
    module.gpt.eval()
    assert torch.equal(plain(x), module.gpt(x))


def test_with_the_plugin_the_checkpoint_holds_the_weights_it_quantized(tmp_path, tokens):
    module = fit(tmp_path, tokens, epochs=1, plugins=[LowPrecisionPlugin(FMT)])
    assert isinstance(module.gpt.transformer.h[0].attn.qkv, QuantizedLinear)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    plain = make_gpt(seed=7)
    plain.load_state_dict(gpt_state(checkpoint), strict=True)
    quantize_linears(plain, FMT)
    x = tokens[:64].reshape(2, 32)
    module.gpt.eval()
    assert torch.equal(plain(x), module.gpt(x))


def test_trainer_resume_continues_exactly(tmp_path, tokens):
    straight = fit(tmp_path / "a", tokens, epochs=2)
    fit(tmp_path / "b", tokens, epochs=1)
    resumed = fit(tmp_path / "b", tokens, epochs=2, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.losses == straight.losses[2:]
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert any(is_multiplier(p) and not torch.all(p == 1) for p in resumed.parameters())


def fabric_steps(fabric, model, optimizer, batches) -> list[float]:
    losses = []
    for inputs, targets in batches:
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def fabric_setup():
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[FabricMergeMultipliers()])
    gpt = make_gpt()
    add_multipliers(gpt)
    optimizer = torch.optim.AdamW(param_groups(gpt), lr=3e-3)
    model, optimizer = fabric.setup(gpt, optimizer)
    return fabric, model, optimizer


def test_fabric_save_is_a_plain_checkpoint_and_load_resumes_exactly(tmp_path, tokens):
    batches = [TokenWindows(tokens, 16)[i] for i in range(4)]
    batches = [(x[None], y[None]) for x, y in batches]
    fabric, model, optimizer = fabric_setup()
    straight = fabric_steps(fabric, model, optimizer, batches)
    expected = model.state_dict()

    fabric, model, optimizer = fabric_setup()
    fabric_steps(fabric, model, optimizer, batches[:2])
    fabric.save(tmp_path / "lit_model.pth", {"model": model, "optimizer": optimizer, "step": 2})

    # litgpt reads lit_model.pth's "model" entry into the unmodified GPT, strictly.
    saved = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    plain = make_gpt(seed=7)
    plain.load_state_dict(saved["model"], strict=True)
    x = batches[0][0]
    assert torch.equal(plain(x), model(x))

    fabric, model, optimizer = fabric_setup()
    state = {"model": model, "optimizer": optimizer}
    remainder = fabric.load(tmp_path / "lit_model.pth", state)
    assert remainder == {"step": 2}
    assert fabric_steps(fabric, model, optimizer, batches[2:]) == straight[2:]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_checkpoints_without_multipliers_pass_through(tmp_path):
    checkpoint = {"state_dict": make_gpt().state_dict(), "epoch": 3, "loops": {1: "x"}}
    assert merge_checkpoint(checkpoint) == checkpoint
    io = MergedCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "plain.ckpt")
    loaded = io.load_checkpoint(tmp_path / "plain.ckpt")
    assert loaded.keys() == checkpoint.keys()
