"""NormMonitor / FabricNormMonitor: every tag is written, at the right steps, with the right value.

The end-to-end tests train the shared test GPT with learnable multipliers, LMD and the MXFP6
plugin, two micro-batches per step, and capture on their own (a witness callback in the
Trainer, the loop itself in Fabric) what the logged step saw: the weights before and after it,
its gradients before clipping, the LMD state, and the inputs of every quantized layer. Each
logged number is then recomputed from these captures in float64 — saturation with numpy from
the MX spec's shared exponent — and read back from the TensorBoard event files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GPTModule, TokenWindows, make_gpt, trainer_kwargs
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lowprec import LMD, LowPrecision, LowPrecisionPlugin, QuantizedLinear, parse
from lightning_lowprec.callbacks import FabricNormMonitor, NormMonitor
from lightning_lowprec.callbacks.monitor import _quantization_sums, _Recorder
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim.groups import is_multiplier, param_groups
from lightning_lowprec.quantizer import quantize

FMT = "mxfp6_e2m3"
EVERY = 2
STEPS = 4  # logs at 2 and 4; step 4 is checked value by value (its sign flips need step 2)
ACCUMULATE = 2
MARGIN = 0.01
WEIGHT_DECAY = 0.1


# -- the independent computation ------------------------------------------------------------


def layer_of(name: str) -> str:
    return name.removesuffix(".parametrizations.weight.original").removesuffix(".weight")


def multiplier_of(name: str) -> str:
    match = re.fullmatch(r"(.*)\.parametrizations\.weight\.0\.(row|column|scalar)_multiplier", name)
    return f"{match[1]}.{match[2]}"


def norm64(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def saturated_count(x: Tensor, fmt_name: str) -> int:
    """Elements beyond max · 2**(floor(log2(block amax)) − emax), from the OCP MX spec; for a
    per-tensor format, beyond the tensor's amax, which its scale maps onto the format's max."""
    fmt = parse(fmt_name)
    a = np.abs(x.double().numpy()).reshape(-1, x.shape[-1])
    if fmt.scaling == "tensor":
        return int((a > a.max()).sum())
    a = np.pad(a, ((0, 0), (0, -a.shape[1] % 32))).reshape(a.shape[0], -1, 32)
    with np.errstate(divide="ignore"):
        exponent = np.clip(np.floor(np.log2(a.max(-1, keepdims=True))) - fmt.emax, -127, 127)
    return int((a > fmt.max * 2.0**exponent).sum())


def quant_stats(tensors: list[Tensor], fmt: str) -> tuple[float, float, float]:
    """(SQNR in dB, saturated fraction, flushed fraction) of the tensors pooled."""
    signal = noise = saturated = flushed = elements = 0
    for x in tensors:
        q = quantize(x, fmt).double()
        x64 = x.double()
        signal += float(x64.square().sum())
        noise += float((x64 - q).square().sum())
        saturated += saturated_count(x, fmt)
        flushed += int(((x64 != 0) & (q == 0)).sum())
        elements += x.numel()
    return 10 * math.log10(signal / noise), saturated / elements, flushed / elements


@dataclass
class Capture:
    """What one logged step saw, captured by the test itself (names as the monitor's model)."""

    multipliers: set[str] = field(default_factory=set)
    before: dict[str, Tensor] = field(default_factory=dict)
    after: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    medians: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)
    signs_before: dict[str, Tensor] = field(default_factory=dict)
    weights_eff: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def start(self, named: dict[str, nn.Parameter], layers: dict[str, QuantizedLinear]) -> None:
        """Before the step's first forward: weights, and hooks on the quantized layers."""
        self.multipliers = {n for n, p in named.items() if is_multiplier(p)}
        self.before = {n: p.detach().clone() for n, p in named.items()}
        for name, layer in layers.items():
            self.inputs[name] = []

            def hook(module, args, output, name=name):
                if module.training:
                    self.inputs[name].append(args[0].detach().clone())

            self.handles.append(layer.register_forward_hook(hook))

    def take_grads(self, named: dict[str, nn.Parameter]) -> None:
        self.grads = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}

    def finish(self, named, layers, optimizer: LMD) -> None:
        """After the step: weights, effective weights, medians."""
        for handle in self.handles:
            handle.remove()
        self.after = {n: p.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            self.weights_eff = {name: layer.weight.clone() for name, layer in layers.items()}
        by_param = {p: n for n, p in named.items()}
        for p, state in optimizer.state.items():
            if state and not state["adamw"]:
                pos, neg = state["log_median_pos"].clone(), state["log_median_neg"].clone()
                self.medians[by_param[p]] = (pos, neg, state["log_m_ref"])


def signs(named: dict[str, nn.Parameter], optimizer: LMD) -> dict[str, Tensor]:
    by_param = {p: n for n, p in named.items()}
    return {
        by_param[p]: p.detach() > 0
        for p, state in optimizer.state.items()
        if state and not state["adamw"]
    }


def expected_scalars(c: Capture) -> dict[str, float]:
    out = {}
    weights = {n: t for n, t in c.after.items() if n not in c.multipliers}
    for name, w in weights.items():
        if w.ndim >= 2:
            out[f"norm/weight/{layer_of(name)}"] = norm64([w])
            change = norm64([w - c.before[name]]) / norm64([c.before[name]])
            out[f"update_ratio/{layer_of(name)}"] = change
    out["norm/weight/global"] = norm64(weights.values())
    out["norm/grad/global"] = norm64(c.grads.values())
    out["norm/grad/global_clipped_params"] = norm64(
        g for n, g in c.grads.items() if n not in c.multipliers
    )
    for name in c.multipliers:
        m = c.after[name].double()
        tag = f"multiplier/{multiplier_of(name)}"
        out.update({f"{tag}/mean": float(m.mean()), f"{tag}/min": float(m.min()),
                    f"{tag}/max": float(m.max())})
    half = 1 / WEIGHT_DECAY
    for name, (pos, neg, log_m_ref) in c.medians.items():
        logs = torch.cat([pos.flatten(), neg.flatten()]).double() - log_m_ref
        tag = f"lmd/{layer_of(name)}"
        out[f"{tag}/logm_mean"] = float(logs.mean())
        out[f"{tag}/logm_std"] = float(logs.std(correction=0))
        out[f"{tag}/at_bound_frac"] = float((logs.abs() >= half * (1 - MARGIN)).double().mean())
        flipped = c.signs_before[name] != (c.after[name] > 0)
        out[f"{tag}/sign_flip_frac"] = float(flipped.double().mean())
    for name, weight in c.weights_eff.items():
        for operand, tensors in (("weight", [weight]), ("act", c.inputs[name])):
            sqnr, saturated, flushed = quant_stats(tensors, FMT)
            out[f"quant/{name}/{operand}_sqnr_db"] = sqnr
            out[f"quant/{name}/{operand}_saturated_frac"] = saturated
            out[f"quant/{name}/{operand}_flushed_frac"] = flushed
    return out


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return {
        tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
    }


def assert_logged(scalars: dict[str, dict[int, float]], expected: dict[str, float]) -> None:
    """The monitor's tags are exactly the expected ones; at STEPS every value matches."""
    ours = {t for t in scalars if t.split("/")[0] in ("norm", "update_ratio", "multiplier",
                                                      "lmd", "quant")}
    assert ours == set(expected)
    for tag, value in expected.items():
        steps = {STEPS} if tag.endswith("sign_flip_frac") else set(range(EVERY, STEPS + 1, EVERY))
        assert set(scalars[tag]) == steps, tag
        # Event files hold float32; the monitor sums in float32 where this test uses float64.
        assert scalars[tag][STEPS] == pytest.approx(value, rel=2e-4, abs=1e-6), tag


def assert_model_covered(expected: dict[str, float], prefix: str) -> None:
    """The expected tags name every kind of number for the test GPT (guards the names)."""
    for tag in (
        "norm/weight/global", "norm/grad/global", "norm/grad/global_clipped_params",
        "norm/weight/{p}transformer.h.0.attn.qkv", "norm/weight/{p}lm_head",
        "update_ratio/{p}transformer.wte", "multiplier/{p}transformer.h.1.mlp.fc.row/max",
        "multiplier/{p}transformer.wte.column/mean", "lmd/{p}transformer.h.0.mlp.proj/logm_std",
        "lmd/{p}lm_head/sign_flip_frac", "quant/{p}transformer.h.1.attn.proj/act_sqnr_db",
        "quant/{p}transformer.h.0.attn.qkv/weight_flushed_frac",
    ):
        assert tag.format(p=prefix) in expected


# -- the model ------------------------------------------------------------------------------


class MonitoredGPT(GPTModule):
    """The test GPT with multipliers, trained by LMD (AdamW rule on norms, biases, multipliers)."""

    def __init__(self) -> None:
        super().__init__()
        add_multipliers(self.gpt, "paper")

    def configure_optimizers(self):
        return LMD(param_groups(self.gpt, weight_decay=WEIGHT_DECAY), lr=1e-2, seed=0)


def quantized_layers(module: nn.Module, prefix: str = "") -> dict[str, QuantizedLinear]:
    return {prefix + n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}


class Witness(L.Callback):
    """Captures step STEPS (and the signs after step EVERY) on its own."""

    def __init__(self) -> None:
        self.capture = Capture()
        self.started = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        named = dict(pl_module.named_parameters())
        step = trainer.global_step
        if step == EVERY and not self.capture.signs_before:
            self.capture.signs_before = signs(named, trainer.optimizers[0])
        if step == STEPS - 1 and not self.started:
            self.started = True
            self.capture.start(named, quantized_layers(pl_module))
        if step == STEPS and not self.capture.after:
            self.capture.finish(named, quantized_layers(pl_module), trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == STEPS - 1:
            self.capture.take_grads(dict(pl_module.named_parameters()))


# -- end to end -----------------------------------------------------------------------------


def test_trainer_logs_every_tag_with_the_values_of_the_step(tmp_path, tokens):
    logger = TensorBoardLogger(tmp_path, name="", version="run")
    witness = Witness()
    trainer = L.Trainer(**trainer_kwargs(
        max_steps=STEPS,
        logger=logger,
        plugins=[LowPrecisionPlugin(FMT)],
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=0.05,  # below the gradients' norm: clipping acts after the monitor read
        callbacks=[NormMonitor(every_n_steps=EVERY, histograms=True), witness],
    ))
    module = MonitoredGPT()
    trainer.fit(module, DataLoader(TokenWindows(tokens, 64), batch_size=4))

    expected = expected_scalars(witness.capture)
    assert_model_covered(expected, "gpt.")
    assert expected["norm/grad/global_clipped_params"] > 0.05
    assert expected["norm/grad/global"] > expected["norm/grad/global_clipped_params"]
    assert all(len(inputs) == ACCUMULATE for inputs in witness.capture.inputs.values())
    assert_logged(read_scalars(logger.log_dir), expected)

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    named = dict(module.named_parameters())
    qkv = events.Histograms("hist/weight/gpt.transformer.h.0.attn.qkv")
    assert [e.step for e in qkv] == [2, 4]
    weight = named["gpt.transformer.h.0.attn.qkv.parametrizations.weight.original"].detach()
    value = qkv[-1].histogram_value
    assert value.num == weight.numel() == sum(value.bucket)
    assert value.min == pytest.approx(float(weight.min()))
    assert value.max == pytest.approx(float(weight.max()))
    row = events.Histograms("hist/multiplier/gpt.transformer.h.0.attn.qkv.row")[-1]
    assert row.histogram_value.num == 384


def test_fabric_loop_logs_every_tag_with_the_values_of_the_step(tmp_path, tokens):
    logger = FabricTensorBoardLogger(tmp_path, name="run")
    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[LowPrecision(FMT)],
        loggers=[logger],
        callbacks=[FabricNormMonitor(every_n_steps=EVERY)],
    )
    gpt = make_gpt()
    add_multipliers(gpt, "paper")
    optimizer = LMD(param_groups(gpt, weight_decay=WEIGHT_DECAY), lr=1e-2, seed=0)
    model, optimizer = fabric.setup(gpt, optimizer)
    named, layers = dict(gpt.named_parameters()), quantized_layers(gpt)
    batches = iter(DataLoader(TokenWindows(tokens, 64), batch_size=4))
    capture, clip_norms = Capture(), {}
    for step in range(1, STEPS + 1):
        if step == STEPS:
            capture.start(named, layers)
            model.eval()  # an eval forward inside the logged step is not an activation sample
            with torch.no_grad():
                model(next(batches)[0])
            model.train()
        for _ in range(ACCUMULATE):
            inputs, targets = next(batches)
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            fabric.backward(loss / ACCUMULATE)
        if step == STEPS:
            capture.take_grads(named)
        clip_norms[step] = float(fabric.clip_gradients(model, optimizer, max_norm=0.05))
        optimizer.step()
        if step == EVERY:
            capture.signs_before = signs(named, optimizer.optimizer)
        if step == STEPS:
            capture.finish(named, layers, optimizer.optimizer)
        optimizer.zero_grad()
    logger.finalize("success")

    expected = expected_scalars(capture)
    assert_model_covered(expected, "")
    assert all(len(inputs) == ACCUMULATE for inputs in capture.inputs.values())
    scalars = read_scalars(logger.log_dir)
    assert_logged(scalars, expected)
    # what clipping saw: the norm fabric.clip_gradients returns, before it clipped (torch's
    # fp32 norm on CPU, measured up to 6e-5 relative off the float64 one the monitor logs)
    assert clip_norms[STEPS] > 0.05
    assert scalars["norm/grad/global_clipped_params"][STEPS] == pytest.approx(
        clip_norms[STEPS], rel=2e-4
    )
    assert not any(layer._forward_hooks for layer in layers.values())


def test_litgpt_style_run_gets_the_monitor_from_the_entry_point(tmp_path, tokens, monkeypatch):
    """Fabric loads factories of lightning.fabric.callbacks_factory (what LitGPT's Fabric does);
    the class itself is a factory, so FabricNormMonitor() must work with no arguments."""
    entry = EntryPoint(
        name="norm_monitor",
        value="lightning_lowprec.callbacks:FabricNormMonitor",
        group="lightning.fabric.callbacks_factory",
    )
    monkeypatch.setattr(
        "lightning.fabric.utilities.registry.entry_points",
        lambda group: [entry] if group == entry.group else [],
    )
    logger = FabricTensorBoardLogger(tmp_path, name="litgpt")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true", loggers=logger)
    assert any(isinstance(c, FabricNormMonitor) for c in fabric._callbacks)
    model = fabric.setup(make_gpt())  # as LitGPT: setup, then setup_optimizers
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
    batch = next(iter(DataLoader(TokenWindows(tokens, 2), batch_size=2)))
    inputs, targets = (t[:, :16] for t in batch)
    for _ in range(50):  # the default interval
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    assert scalars["norm/weight/global"].keys() == {50}
    assert scalars["norm/grad/global"][50] == pytest.approx(
        scalars["norm/grad/global_clipped_params"][50]
    )
    assert "update_ratio/transformer.h.1.mlp.proj" in scalars
    assert not any(tag.startswith(("quant/", "lmd/", "multiplier/")) for tag in scalars)


def test_under_bf16_autocast_the_statistics_are_of_the_bf16_operands(tmp_path, tokens):
    """QuantizedLinear quantizes bf16 casts of its operands under autocast: so does the monitor."""
    logger = FabricTensorBoardLogger(tmp_path, name="bf16")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT, autocast="bf16")],
                      loggers=logger, callbacks=[FabricNormMonitor(every_n_steps=1)])
    gpt = make_gpt()
    model, optimizer = fabric.setup(gpt, torch.optim.SGD(gpt.parameters(), lr=1e-3))
    layer = gpt.transformer.h[1].mlp.proj
    inputs = []
    layer.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    x, y = next(iter(DataLoader(TokenWindows(tokens, 2), batch_size=2)))
    fabric.backward(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()))
    optimizer.step()
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    tag = "quant/transformer.h.1.mlp.proj"
    for operand, tensor in (("weight", layer.weight.detach()), ("act", inputs[0])):
        sqnr, saturated, flushed = quant_stats([tensor.bfloat16()], FMT)
        assert scalars[f"{tag}/{operand}_sqnr_db"][1] == pytest.approx(sqnr, rel=2e-4)
        assert scalars[f"{tag}/{operand}_saturated_frac"][1] == pytest.approx(saturated, abs=1e-6)
        assert scalars[f"{tag}/{operand}_flushed_frac"][1] == pytest.approx(flushed, abs=1e-6)


def test_medians_at_the_soft_clip_bounds_are_counted_within_the_margin():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    layer = model[0]
    optimizer = LMD(layer.parameters(), lr=0.1, weight_decay=0.5, seed=0)  # bounds at ±2 nats
    layer.weight.grad = torch.randn(4, 8)
    optimizer.step()
    state = optimizer.state[layer.weight]
    log_m_ref = state["log_m_ref"]
    with torch.no_grad():
        state["log_median_pos"][0] = log_m_ref + 2.0  # on the upper bound
        state["log_median_neg"][1, :4] = log_m_ref - 2.0 + 0.015  # within 1% of the half-width
        state["log_median_neg"][2, :4] = log_m_ref - 2.0 + 0.025  # just outside
    recorder = _Recorder(1, False, False, MARGIN)
    recorder.watch(model)
    scalars, _ = recorder.collect([optimizer])
    assert scalars["lmd/0/at_bound_frac"] == pytest.approx(12 / 64)

    optimizer.param_groups[0]["weight_decay"] = 0.0  # no decay, no bounds
    scalars, _ = recorder.collect([optimizer])
    assert scalars["lmd/0/at_bound_frac"] == 0.0
    assert scalars["lmd/0/sign_flip_frac"] == 0.0  # nothing moved since the previous collect


# -- rank, resume, misuse -------------------------------------------------------------------


def test_only_rank_zero_logs(tmp_path, tokens, monkeypatch):
    """Every rank computes (under FSDP2 its shards take part in the reductions); the others
    write nothing."""
    monkeypatch.setattr(L.Fabric, "is_global_zero", property(lambda self: False))
    logger = FabricTensorBoardLogger(tmp_path, name="rank1")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(FMT)], loggers=logger,
                      callbacks=[FabricNormMonitor(every_n_steps=1)])
    gpt = make_gpt()
    model, optimizer = fabric.setup(gpt, torch.optim.SGD(gpt.parameters(), lr=1e-3))
    inputs, targets = next(iter(DataLoader(TokenWindows(tokens, 2), batch_size=2)))
    for _ in range(2):
        assert all(m._forward_hooks for m in quantized_layers(gpt).values())  # it computes
        fabric.backward(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
        optimizer.step()
        optimizer.zero_grad()
    assert not (tmp_path / "rank1").exists()


def test_fabric_step_count_resumes_from_its_state_dict(tmp_path, tokens):
    monitor = FabricNormMonitor(every_n_steps=3)
    logger = FabricTensorBoardLogger(tmp_path, name="resume")
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=logger, callbacks=[monitor])
    gpt = make_gpt()
    model, optimizer = fabric.setup(gpt, torch.optim.SGD(gpt.parameters(), lr=1e-3))
    monitor.load_state_dict({"step": 4})  # as fabric.load would: the next log is at step 6
    inputs, targets = next(iter(DataLoader(TokenWindows(tokens, 2), batch_size=2)))
    for _ in range(3):
        fabric.backward(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
        optimizer.step()
        optimizer.zero_grad()
    logger.finalize("success")
    assert monitor.state_dict() == {"step": 7}
    assert read_scalars(logger.log_dir)["norm/weight/global"].keys() == {6}


def test_fabric_setup_module_alone_warns_how_to_attach(tokens):
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[FabricNormMonitor()])
    model = fabric.setup_module(make_gpt())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=1e-3))
    inputs, targets = next(iter(DataLoader(TokenWindows(tokens, 2), batch_size=2)))
    fabric.backward(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
    with pytest.warns(UserWarning, match="monitor.on_after_setup"):
        optimizer.step()


def test_trainer_without_a_logger_is_refused(tokens):
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[NormMonitor()]))
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        trainer.fit(GPTModule(), DataLoader(TokenWindows(tokens, 4), batch_size=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive int"),
        ({"every_n_steps": 2.0}, "every_n_steps must be a positive int"),
        ({"every_n_steps": True}, "every_n_steps must be a positive int"),
        ({"histograms": 1}, "histograms must be True or False"),
        ({"update_ratio": None}, "update_ratio must be True or False"),
        ({"bound_margin": 1.0}, r"bound_margin must be a number in \[0, 1\)"),
        ({"bound_margin": -0.1}, r"bound_margin must be a number in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("cls", [NormMonitor, FabricNormMonitor])
def test_arguments_are_validated(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# -- the quantization statistics ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "fp8_e4m3"])
def test_saturation_and_flushing_follow_the_spec(fmt):
    torch.manual_seed(0)
    # heavy tails (saturation), tiny values (flushing), exact zeros, a subnormal-amax block and
    # a last dimension that is not a multiple of 32
    x = torch.randn(16, 70) * torch.rand(16, 70).pow(6) * 10.0
    x[0, :5] = 0.0
    x[1, :32] = 1e-40
    x[2, 0], x[2, 1] = 7.9, 4.0  # saturates in FP6 E2M3 (max 7.5 in a block whose amax < 8)
    signal, noise, saturated, flushed = _quantization_sums(x, parse(fmt), "even", None).tolist()
    sqnr, saturated_frac, flushed_frac = quant_stats([x], fmt)
    assert saturated == saturated_count(x, fmt) == saturated_frac * x.numel()
    assert flushed == pytest.approx(flushed_frac * x.numel())
    assert 10 * math.log10(signal / noise) == pytest.approx(sqnr, rel=1e-5)
    if fmt.startswith("fp8"):
        assert saturated == 0
    if fmt in ("mxfp4_e2m1", "mxfp6_e2m3"):
        assert saturated > 0 and flushed > 0


def test_stochastic_rounding_leaves_the_global_random_stream_alone():
    """The monitor rounds with its own generator: a run's random numbers do not depend on it."""
    model = nn.Sequential(QuantizedLinear(64, 32, fmt="mxfp4_e2m1", rounding="stochastic"))
    x = torch.randn(4, 64)
    recorder = _Recorder(1, False, True, MARGIN)
    recorder.watch(model)
    states = []
    for armed in (False, True):
        torch.manual_seed(0)
        if armed:
            recorder.arm()
        model(x)
        scalars, _ = recorder.collect([])
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
    assert 10 < scalars["quant/0/act_sqnr_db"] < 30
    assert not model[0]._forward_hooks
