"""LowPrecision (Fabric) and LowPrecisionPlugin (Trainer) on a real litgpt GPT.

Training runs are a few dozen steps of a 2-layer, 128-wide GPT on byte-level text; the loss
must fall well below its starting value (ln 4096 = 8.3 at initialisation).
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BLOCK_LINEARS,
    SEQ_LEN,
    GPTModule,
    TokenWindows,
    gpt_config,
    make_gpt,
    trainer_kwargs,
)
from litgpt import GPT
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowprec import LMD, LowPrecision, LowPrecisionPlugin, MPlusAdam, QuantizedLinear
from lightning_lowprec.quantizer import quantize

FMT = "mxfp6_e2m3"
SETTINGS_CHANGED = "checkpoint was saved with other LowPrecisionPlugin settings"


def quantized_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def mean(values) -> float:
    return sum(values) / len(values)


def assert_learned(losses: list[float], steps: int) -> None:
    assert len(losses) == steps
    assert all(torch.isfinite(torch.tensor(losses)))
    assert mean(losses[-4:]) < mean(losses[:4]) - 1.5, losses


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def test_trainer_trains_quantized_layers_and_evaluates(loader):
    module = GPTModule()
    plugin = LowPrecisionPlugin(FMT)
    trainer = L.Trainer(**trainer_kwargs(max_steps=32, plugins=[plugin], gradient_clip_val=1.0))
    trainer.fit(module, loader)

    assert_learned(module.losses, 32)
    assert quantized_names(module) == [f"gpt.{name}" for name in BLOCK_LINEARS]
    assert type(module.gpt.lm_head) is nn.Linear
    assert trainer.precision == "32-true"

    val = trainer.validate(module, loader, verbose=False)[0]["val_loss"]
    test = trainer.test(module, loader, verbose=False)[0]["test_loss"]
    assert val == pytest.approx(test) and val < module.losses[0] - 1.5
    predictions = trainer.predict(module, loader)
    assert len(predictions) == len(loader) and predictions[0].shape == (8, SEQ_LEN)
    assert quantized_names(module) == [f"gpt.{name}" for name in BLOCK_LINEARS]


def test_gradient_clipping_works_with_a_fused_optimizer():
    """Lightning's bf16-mixed refuses this, assuming a gradient scaler; there is none here."""
    weight = nn.Parameter(torch.zeros(4, 4))
    weight.grad = torch.full((4, 4), 10.0)
    optimizer = torch.optim.AdamW([weight], fused=True)
    LowPrecisionPlugin(FMT, autocast="bf16").clip_gradients(optimizer, clip_val=1.0)
    assert weight.grad.norm() == pytest.approx(1.0, rel=1e-4)


def test_trainer_bf16_autocast_through_the_plugin(tokens):
    """Short: bf16 matmuls are ~60x slower than fp32 on CPUs without native bf16."""
    module = GPTModule()
    output_dtypes = []
    module.gpt.transformer.h[0].mlp.fc.register_forward_hook(
        lambda layer, args, out: output_dtypes.append((type(layer), out.dtype))
    )
    plugin = LowPrecisionPlugin(FMT, autocast="bf16", quantize_backward=True)
    trainer = L.Trainer(**trainer_kwargs(max_steps=12, plugins=[plugin]))
    trainer.fit(module, DataLoader(TokenWindows(tokens, 12), batch_size=1))

    assert trainer.precision == "bf16-mixed"
    assert set(output_dtypes) == {(QuantizedLinear, torch.bfloat16)}
    assert mean(module.losses[-3:]) < mean(module.losses[:3]) - 0.5, module.losses
    assert all(p.dtype == torch.float32 for p in module.parameters())


class LMDModule(GPTModule):
    def configure_optimizers(self):
        return LMD(self.parameters(), lr=1e-2, seed=0)


def test_trainer_bf16_true_through_the_plugin(tokens):
    """param_dtype="bf16" is the Trainer's bf16-true: the model is converted at setup and LMD
    trains bf16 weights from fp32 state, with bf16 quantized operands."""
    module = LMDModule()
    operand_dtypes = []
    module.gpt.transformer.h[0].mlp.fc.register_forward_hook(
        lambda layer, args, out: operand_dtypes.append((type(layer), args[0].dtype))
    )
    plugin = LowPrecisionPlugin(FMT, param_dtype="bf16")
    trainer = L.Trainer(**trainer_kwargs(max_steps=12, plugins=[plugin]))
    trainer.fit(module, DataLoader(TokenWindows(tokens, 12), batch_size=1))

    assert trainer.precision == "bf16-true"
    assert set(operand_dtypes) == {(QuantizedLinear, torch.bfloat16)}
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    state = trainer.optimizers[0].state[module.gpt.transformer.h[0].mlp.fc.weight]
    assert state["log_median_pos"].dtype == torch.float32
    assert mean(module.losses[-3:]) < mean(module.losses[:3]) - 0.5, module.losses


def test_checkpoint_holds_the_settings_and_resumes(loader, tmp_path):
    module = GPTModule()
    trainer = L.Trainer(**trainer_kwargs(max_steps=6, plugins=[LowPrecisionPlugin(FMT)]))
    trainer.fit(module, loader)
    path = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["LowPrecisionPlugin"] == LowPrecisionPlugin(FMT).state_dict()
    assert saved["LowPrecisionPlugin"]["w_fmt"] == FMT

    # Same settings: a new Trainer resumes silently and continues to step 12.
    resumed = GPTModule(seed=1)
    trainer = L.Trainer(**trainer_kwargs(max_steps=12, plugins=[LowPrecisionPlugin(FMT)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(resumed, loader, ckpt_path=path)
    assert not [w for w in caught if SETTINGS_CHANGED in str(w.message)]
    assert trainer.global_step == 12 and len(resumed.losses) == 6
    assert quantized_names(resumed) == [f"gpt.{name}" for name in BLOCK_LINEARS]
    assert resumed.losses[0] < module.losses[0] - 1.0  # it starts from the trained weights

    # Other settings: the weights are restored, the change is reported, the new settings rule.
    other = GPTModule(seed=2)
    plugin = LowPrecisionPlugin("mxfp4_e2m1", quantize_backward=True)
    trainer = L.Trainer(**trainer_kwargs(max_steps=6, plugins=[plugin]))
    with pytest.warns(UserWarning, match=SETTINGS_CHANGED) as record:
        trainer.fit(other, loader, ckpt_path=path)
    message = next(str(w.message) for w in record if SETTINGS_CHANGED in str(w.message))
    assert "w_fmt: 'mxfp6_e2m3' -> 'mxfp4_e2m1'" in message
    assert "quantize_backward: False -> True" in message
    for name, value in module.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    assert other.gpt.transformer.h[0].attn.qkv.w_fmt.name == "mxfp4_e2m1"


# --------------------------------------------------------------------------------------------
# Fabric
# --------------------------------------------------------------------------------------------


def test_fabric_trains_with_an_optimizer_built_before_setup(tokens):
    gpt = make_gpt()
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    qkv = gpt.transformer.h[0].attn.qkv
    weight = qkv.weight
    before = weight.detach().clone()

    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    model, optimizer = fabric.setup(gpt, optimizer)
    assert gpt.transformer.h[0].attn.qkv is qkv and qkv.weight is weight
    assert quantized_names(gpt) == BLOCK_LINEARS and type(gpt.lm_head) is nn.Linear

    loader = fabric.setup_dataloaders(DataLoader(TokenWindows(tokens, 64), batch_size=8))
    losses = []
    for _ in range(4):
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert_learned(losses, 32)
    assert not torch.equal(weight, before)  # the optimizer built before setup moved it


def test_fabric_bf16_true_creates_converts_and_returns_fp32(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1,
                      plugins=[LowPrecision(FMT, param_dtype="bf16")])
    with fabric.init_module():
        created = GPT(gpt_config())
    assert {p.dtype for p in created.parameters()} == {torch.bfloat16}
    gpt = make_gpt()  # fp32, converted by setup
    optimizer = MPlusAdam(gpt.parameters(), lr=3e-3, seed=0)  # storage=None: rounds into bf16
    model, optimizer = fabric.setup(gpt, optimizer)
    assert {p.dtype for p in gpt.parameters()} == {torch.bfloat16}
    assert quantized_names(gpt) == BLOCK_LINEARS
    inputs, targets = TokenWindows(tokens, 4)[0]
    losses = []
    for _ in range(8):
        logits = model(inputs[None])
        assert logits.dtype == torch.float32  # convert_output
        loss = F.cross_entropy(logits.flatten(0, 1), targets)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert {p.dtype for p in gpt.parameters()} == {torch.bfloat16}
    assert fabric.strategy.precision.state_dict()["param_dtype"] == "bf16"


def test_fabric_saves_and_loads_the_settings_with_the_state(tmp_path):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    model = fabric.setup(make_gpt())
    fabric.save(
        tmp_path / "state.ckpt", {"model": model, "low_precision": fabric.strategy.precision}
    )

    other = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision("mxfp8_e4m3")])
    restored = other.setup(make_gpt(seed=1))
    state = {"model": restored, "low_precision": other.strategy.precision}
    with pytest.warns(UserWarning, match="w_fmt: 'mxfp6_e2m3' -> 'mxfp8_e4m3'"):
        other.load(tmp_path / "state.ckpt", state)
    assert torch.equal(restored.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_logits_equal_a_hand_built_fake_quant_forward(autocast, tokens):
    gpt = make_gpt()
    reference = copy.deepcopy(gpt)
    for name, layer in reference.named_modules():
        if isinstance(layer, nn.Linear) and name != "lm_head":
            layer.forward = fake_quant_forward(layer)

    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT, autocast=autocast)])
    model = fabric.setup(gpt)
    batch = tokens[: 2 * SEQ_LEN].view(2, SEQ_LEN)
    logits = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        expected = reference(batch).float()
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)
    # The quantization is visible in the logits.
    assert not torch.allclose(logits, make_gpt()(batch), atol=1e-3)


def fake_quant_forward(layer: nn.Linear):
    """A Linear forward written from scratch: quantize, cast as autocast would, F.linear."""

    def forward(x):
        x, weight, bias = quantize(x, FMT), quantize(layer.weight, FMT), layer.bias
        if torch.is_autocast_enabled("cpu"):
            x, weight, bias = (t.to(torch.bfloat16) for t in (x, weight, bias))
        return F.linear(x, weight, bias)

    return forward


# --------------------------------------------------------------------------------------------
# Errors and Lightning's rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LowPrecision, LowPrecisionPlugin])
def test_bad_settings_raise(cls):
    with pytest.raises(ValueError, match="Unknown number format 'mxfp5'. Valid formats: mxfp8"):
        cls("mxfp5")
    with pytest.raises(ValueError, match="Unknown autocast 'fp16'. Valid values: None, 'bf16'"):
        cls(FMT, autocast="fp16")
    with pytest.raises(ValueError, match="Unknown rounding 'up'"):
        cls(FMT, rounding="up")
    with pytest.raises(ValueError, match="Unknown param_dtype 'fp16'. Valid values: None, 'bf16'"):
        cls(FMT, param_dtype="fp16")
    with pytest.raises(ValueError, match="autocast='bf16' is 'bf16-mixed'. Pass one."):
        cls(FMT, param_dtype="bf16", autocast="bf16")


def test_a_model_without_selected_linear_layers_raises_at_setup():
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)])
    with pytest.raises(ValueError, match="No Linear layer of Sequential is selected"):
        fabric.setup(nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lm_head to exclude: the default pattern is silent
        fabric.setup(nn.Sequential(nn.Linear(8, 8)))
    fabric = L.Fabric(accelerator="cpu", plugins=[LowPrecision(FMT, include=["attn", "mlp"])])
    with pytest.warns(UserWarning, match="'mlp' matches no Linear layer"):
        fabric.setup(nn.Sequential(nn.Linear(8, 8), nn.ModuleDict({"attn": nn.Linear(8, 8)})))


def test_precision_string_with_the_plugin_is_lightnings_error():
    with pytest.raises(ValueError, match="Received both `precision=bf16-mixed`"):
        L.Trainer(accelerator="cpu", precision="bf16-mixed", plugins=[LowPrecisionPlugin(FMT)])
    with pytest.raises(ValueError, match="Received both `precision=bf16-mixed`"):
        L.Fabric(accelerator="cpu", precision="bf16-mixed", plugins=[LowPrecision(FMT)])


class BuiltInConfigureModel(GPTModule):
    """The GPT built in ``configure_model`` (as litgpt's ``LLM.trainer_setup`` or a sharded
    model would), trained by LMD."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.gpt = None
        self.losses = []

    def configure_model(self):
        if self.gpt is None:
            self.gpt = make_gpt()

    def configure_optimizers(self):
        return LMD(self.parameters(), seed=0)


def test_a_model_built_in_configure_model_is_quantized_and_sampled(loader):
    """Lightning calls ``configure_model`` before ``precision.convert_module``
    (``Trainer._run``: configure_model, then ``strategy.setup``), so nothing is missed."""
    module = BuiltInConfigureModel()
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, plugins=[LowPrecisionPlugin(FMT)]))
    trainer.fit(module, loader)
    assert isinstance(module.gpt.transformer.h[0].attn.qkv, QuantizedLinear)
    assert not isinstance(module.gpt.lm_head, QuantizedLinear)
    assert not trainer.optimizers[0].holds_sample and trainer.optimizers[0].state


@pytest.mark.parametrize("cls", [LowPrecision, LowPrecisionPlugin])
def test_every_argument_is_documented_for_the_cli_help(cls):
    """LightningCLI (jsonargparse) shows the class docstring's Args per argument."""
    import inspect

    docstring_parser = pytest.importorskip("docstring_parser")

    documented = {p.arg_name for p in docstring_parser.parse(cls.__doc__).params}
    assert documented == set(inspect.signature(cls).parameters)
