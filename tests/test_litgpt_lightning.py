"""litgpt's ``LLM`` Python API inside a LightningModule, with this package and no patching.

The supported alternative to ``lowprec-litgpt`` (docs/litgpt-lightning.md): a LightningModule
that holds ``LLM.load(...)``'s model, built in ``__init__``, trained by ``L.Trainer`` with
:class:`~lightning_lowprec.LowPrecisionPlugin`, :class:`~lightning_lowprec.callbacks.
MergeMultipliers` and :class:`~lightning_lowprec.callbacks.NormMonitor`: LMD at posterior
samples, MXFP6 matmuls and learnable multipliers, and a checkpoint litgpt's plain ``GPT`` loads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_lowprec import LMD, LowPrecisionPlugin, QuantizedLinear
from lightning_lowprec.callbacks import MergeMultipliers, NormMonitor
from lightning_lowprec.litgpt.checkpoint import make_default
from lightning_lowprec.multipliers import add_multipliers, merge_multipliers
from lightning_lowprec.optim import param_groups

STEPS = 3


class LitLLM(L.LightningModule):
    """The docs page's module: litgpt's LLM, multipliers and LMD on named groups."""

    def __init__(self, checkpoint_dir: Path, build_in: str = "__init__") -> None:
        super().__init__()
        from litgpt.api import LLM

        self.llm = LLM.load(str(checkpoint_dir), distribute=None)
        self.build_in = build_in
        if build_in == "__init__":
            self.llm.trainer_setup()  # builds the GPT now and loads lit_model.pth
            add_multipliers(self.llm.model, placement="paper")

    def setup(self, stage: str) -> None:
        if self.build_in == "setup":  # litgpt's own LightningModule example
            self.llm.trainer_setup()

    def configure_model(self) -> None:
        if self.build_in == "configure_model" and self.llm.model is None:
            self.llm.trainer_setup()

    def training_step(self, batch, batch_idx):
        _, loss = self.llm(batch["input_ids"], batch["labels"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return LMD(param_groups(self, weight_decay=0.1), lr=0.03, sigma=0.05)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[str, Path]:
    return make_default(tmp_path_factory.mktemp("lowprec-default"))


def instruction_loader(default: dict[str, Path]):
    from litgpt import Tokenizer
    from litgpt.data import JSON

    data = JSON(json_path=default["instructions"], mask_prompt=True, num_workers=0)
    data.connect(tokenizer=Tokenizer(default["checkpoint"]), batch_size=4, max_seq_length=64)
    data.setup()
    return data.train_dataloader()


def trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        plugins=[LowPrecisionPlugin("mxfp6_e2m3")],
        callbacks=[MergeMultipliers(), NormMonitor(every_n_steps=1)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )


def test_llm_in_a_lightning_module_trains_with_lmd_mxfp6_and_multipliers(default, tmp_path):
    from litgpt import GPT, Config

    module = LitLLM(default["checkpoint"])
    before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    fit = trainer(tmp_path)
    fit.fit(module, instruction_loader(default))

    gpt = module.llm.model
    linears = [m for m in gpt.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(linears) - 1  # every Linear but the LM head
    assert isinstance(fit.optimizers[0], LMD) and fit.global_step == STEPS
    multipliers = [p for n, p in gpt.named_parameters() if "multiplier" in n]
    assert multipliers and any(not torch.equal(m, torch.ones_like(m)) for m in multipliers)

    path = tmp_path / "fit.ckpt"
    fit.save_checkpoint(path)
    weights = torch.load(path, weights_only=False)["state_dict"]
    weights = {k.removeprefix("llm."): v for k, v in weights.items()}
    plain = GPT(Config.from_file(default["checkpoint"] / "model_config.yaml"))
    plain.load_state_dict(weights, strict=True)  # merged: litgpt's own GPT loads it
    assert any(not torch.equal(before[k], weights[k]) for k in before if k in weights)

    merge_multipliers(gpt)  # a litgpt checkpoint directory, for litgpt generate / chat
    module.llm.save(tmp_path / "final")
    saved = torch.load(tmp_path / "final" / "lit_model.pth", weights_only=False)
    GPT(Config.from_file(tmp_path / "final" / "model_config.yaml")).load_state_dict(saved)
    assert all(torch.equal(saved[k], weights[k]) for k in weights)

    (metrics,) = Path(fit.logger.log_dir).glob("metrics.csv")
    header = next(csv.reader(metrics.open()))
    assert "norm/weight/global" in header and "train_loss" in header


@pytest.mark.parametrize("build_in", ["setup", "configure_model"])
def test_a_model_built_in_a_later_hook_is_quantized_or_refused(default, tmp_path, build_in):
    """The Trainer converts the model after ``setup`` and ``configure_model``: a GPT built
    there is quantized too (or, should that change, the fit must fail naming the hook)."""
    module = LitLLM(default["checkpoint"], build_in=build_in)
    try:
        trainer(tmp_path).fit(module, instruction_loader(default))
    except (RuntimeError, ValueError) as error:
        assert build_in in str(error)
        return
    linears = [m for m in module.llm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, QuantizedLinear) for m in linears) == len(linears) - 1


def test_lora_quantizes_the_frozen_base_layers_only():
    """litgpt's LoRA layers hold the base weight in an ``nn.Linear`` (quantized) and compute
    the adapter ``x @ A^T @ B^T`` with plain matmuls (left at the run's precision): what
    docs/litgpt-lightning.md and the lowprec section's docs say."""
    from litgpt.lora import GPT, Config, LoRALinear

    from lightning_lowprec import quantize_linears

    config = Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096, n_layer=1,
                              lora_r=4, lora_alpha=8, lora_query=True, lora_value=True,
                              lora_projection=True, lora_mlp=True)
    model = GPT(config)
    quantize_linears(model, "mxfp6_e2m3")
    loras = [m for name, m in model.named_modules()
             if isinstance(m, LoRALinear) and name != "lm_head"]  # the head stays unquantized
    assert loras and all(isinstance(m.linear, QuantizedLinear) for m in loras)
    quantized_params = {id(p) for m in model.modules() if isinstance(m, QuantizedLinear)
                        for p in m.parameters()}
    assert all(id(m.lora_A) not in quantized_params and id(m.lora_B) not in quantized_params
               for m in loras)
