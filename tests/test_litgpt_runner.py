"""`lowprec-litgpt`: litgpt's own recipes with our plugin, optimizer and callbacks.

Every recipe in ``recipes/`` runs a few steps on the built-in default (a random-init
pythia-14m-architecture GPT and docstring data made on the spot); the outputs must be plain
LitGPT checkpoints, the hyperparameters must be the run's own, and the additions (quantization,
posterior sampling, multipliers, clipping, monitoring) must have taken effect.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lowprec.callbacks import FACTORS_KEY
from lightning_lowprec.litgpt import patch
from lightning_lowprec.litgpt.checkpoint import make_default
from lightning_lowprec.litgpt.options import LowPrecOptions, resume_changes
from lightning_lowprec.litgpt.recipes import RECIPES_DIR, TINY_LR, tiny_overrides
from lightning_lowprec.litgpt.runner import (
    OPTIONS_FILE,
    SUMMARY_FILE,
    ConfigError,
    main,
    run,
    split_args,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = [RECIPES_DIR / f"{name}.yaml" for name in sorted(TINY_LR)]
STEPS = 3


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[str, Path]:
    return make_default(tmp_path_factory.mktemp("lowprec-default"))


def recipe_args(recipe: Path, default: dict[str, Path], out: Path) -> list[str]:
    """The recipe on the test's default directory, for STEPS optimizer steps."""
    command = recipe.name.split("-")[0]
    args = ["--config", str(recipe), *tiny_overrides(recipe.stem), "--out_dir", str(out),
            "--train.log_interval", "1",
            "--eval.interval", "1000", "--eval.max_iters", "1", "--train.lr_warmup_steps", "1",
            "--lowprec.monitor", "{every_n_steps: 1}", "--lowprec.progress_bar", "false"]
    if command == "pretrain":
        return args + [
            "--tokenizer_dir", str(default["checkpoint"]),
            "--data.train_data_path", str(default["text_train"]),
            "--data.val_data_path", str(default["text_val"]),
            "--train.max_tokens", str(STEPS * 8 * 128),
        ]
    return [str(default["checkpoint"]), *args,
        "--data.json_path", str(default["instructions"]),
        "--train.max_steps", str(STEPS), "--eval.max_new_tokens", "4"]


def scalars(out: Path, value: str = "value") -> dict[str, list[float]]:
    """Every scalar tag of the run's last TensorBoard session: its values (or ``"step"``s)."""
    events = sorted((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))[-1]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [getattr(e, value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_and_writes_a_plain_litgpt_checkpoint(recipe, default, tmp_path):
    from litgpt import GPT, Config

    out = tmp_path / "out"
    command = recipe.name.split("-")[0]
    section = yaml.safe_load(recipe.read_text())["lowprec"]
    section["optimizer"]["init_args"]["lr"] = TINY_LR[recipe.stem]  # tiny_overrides
    if command == "pretrain":
        section["compile"] = False
    summary = run(command, recipe_args(recipe, default, out))

    assert summary["steps"] == STEPS and summary["tokens"] > 0
    assert summary["tokens_per_second"] > 0
    assert (out / SUMMARY_FILE).is_file()
    final = out / "final"
    config = Config.from_file(final / "model_config.yaml")
    plain = GPT(config).state_dict()
    checkpoint = torch.load(final / "lit_model.pth", weights_only=False)
    weights = checkpoint.get("model", checkpoint)
    # The unmodified model class loads it: no multiplier or quantizer keys are left over.
    assert weights.keys() == plain.keys()
    GPT(config).load_state_dict(weights, strict=True)
    assert all(torch.isfinite(w).all() for w in weights.values())
    initial = torch.load(default["checkpoint"] / "lit_model.pth")
    if command != "pretrain":
        assert any(not torch.equal(initial[k], weights[k]) for k in initial)
    if section.get("multipliers"):
        assert FACTORS_KEY in checkpoint  # what resuming needs, beside the merged weights

    # hyperparameters.yaml holds this run's values although sys.argv is pytest's.
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert Path(hparams["out_dir"]) == out
    if command != "pretrain":  # the positional checkpoint beats the recipe's checkpoint_dir
        assert Path(hparams["checkpoint_dir"]) == default["checkpoint"]
    assert hparams["train"]["log_interval"] == 1
    assert hparams["optimizer"] == section["optimizer"]  # the optimizer that trained
    recorded = yaml.safe_load((final / OPTIONS_FILE).read_text())["lowprec"]
    assert LowPrecOptions.from_mapping(recorded) == LowPrecOptions.from_mapping(
        {**section, "monitor": {"every_n_steps": 1}, "progress_bar": False}
    )

    logged = scalars(out)
    assert any(tag.startswith("norm/") for tag in logged), sorted(logged)  # NormMonitor
    if section.get("fmt"):
        assert any(tag.startswith("quant/") for tag in logged), sorted(logged)
    if "LMD" in section["optimizer"]["class_path"]:
        assert any(tag.startswith("lmd/") for tag in logged), sorted(logged)


@pytest.fixture(scope="module")
def pretrained(default, tmp_path_factory) -> Path:
    """The hardest recipe's output: LMD + MXFP4 + merged multipliers."""
    out = tmp_path_factory.mktemp("pretrained")
    recipe = REPO / "recipes" / "pretrain-lmd-mxfp4-multipliers.yaml"
    run("pretrain", recipe_args(recipe, default, out))
    return out / "final"


def test_litgpt_generate_runs_on_the_output(pretrained):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "litgpt", "generate", str(pretrained), "--prompt", "Return the",
         "--max_new_tokens", "5"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Return the" in result.stdout


def test_the_merged_checkpoint_unmerges_into_trained_multipliers(pretrained):
    """The multiplier factors rebuild the raw weights: un-merging gives finite multipliers."""
    from lightning_lowprec.callbacks import unmerge_checkpoint

    checkpoint = unmerge_checkpoint(torch.load(pretrained / "lit_model.pth", weights_only=False))
    multipliers = [v for k, v in checkpoint["model"].items() if k.endswith("_multiplier")]
    assert multipliers and all(torch.isfinite(m).all() for m in multipliers)
    assert any(not torch.equal(m, torch.ones_like(m)) for m in multipliers)  # they trained


def test_pretrain_monitor_steps_are_litgpts(pretrained):
    """pretrain logs an iteration's loss at iter_num - 1: the monitor's step k goes there."""
    steps = scalars(pretrained.parent, "step")
    assert steps["norm/weight/global"] == steps["loss"] == list(range(STEPS))


RESUMED = {
    # finetune_full with 2 micro-batches per step: litgpt logs every iteration, the monitor
    # every step, at the iteration that ends it.
    "finetune_full-lmd-mxfp6": (["--train.micro_batch_size", "4", "--train.max_steps", "4"],
                                [6, 8]),
    # pretrain (multipliers merged into the checkpoint): loss at iter_num - 1.
    "pretrain-lmd-mxfp4-multipliers": (["--train.max_tokens", str(4 * 8 * 128)], [2, 3]),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RESUMED)
def test_resume_continues_bit_exactly_with_the_counters(
    recipe, default, tmp_path, capsys, monkeypatch
):
    """4 steps in one go, and 2 + --resume 2 from the step-2 checkpoint: the same weights,
    the monitor continues at litgpt's steps, the bar at 2/4, the summary counts both; litgpt's
    prints and the line of what lowprec applied go above the bar."""
    import tqdm.std

    written: list[str] = []
    write = tqdm.std.tqdm.write
    monkeypatch.setattr(tqdm.std.tqdm, "write", classmethod(
        lambda cls, text, **kwargs: (written.append(text), write(text, **kwargs))))
    command = recipe.split("-")[0]
    extra, resumed_monitor_steps = RESUMED[recipe]
    args = recipe_args(RECIPES_DIR / f"{recipe}.yaml", default, tmp_path / "whole")
    args = [*args, *extra, "--train.save_interval", "2"]
    run(command, args)
    whole = tmp_path / "whole"
    (first,) = sorted(whole.glob("step-*2"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    args = [a if a != str(whole) else str(resumed) for a in args]
    capsys.readouterr()
    summary = run(command, [*args, "--resume", str(first / "lit_model.pth"),
                            "--lowprec.progress_bar", "true"])

    final = {d: torch.load(d / "final" / "lit_model.pth", weights_only=False)
             for d in (whole, resumed)}
    assert final[whole]["model"].keys() == final[resumed]["model"].keys()
    assert all(torch.equal(final[whole]["model"][k], final[resumed]["model"][k])
               for k in final[whole]["model"])
    steps = scalars(resumed, "step")
    assert steps["norm/weight/global"] == resumed_monitor_steps
    assert set(steps["norm/weight/global"]) <= set(steps["loss"])
    assert summary["steps"] == 4 and summary["sessions"] == 2
    assert summary["session"]["steps"] == 2 and summary["tokens"] > summary["session"]["tokens"]
    assert any(line.startswith("Epoch 1 | iter") for line in written)
    assert any(line.startswith("lowprec: mxfp") and "optimizer LMD lr" in line
               and "posterior sampling" in line for line in written)
    assert "4/4" in capsys.readouterr().err and json.loads(
        (resumed / SUMMARY_FILE).read_text())["steps"] == 4


def test_resume_refuses_another_optimizer_and_warns_on_another_format(default, tmp_path):
    out = tmp_path / "out"
    step = out / "step-000002"
    step.mkdir(parents=True)
    (step / "lit_model.pth").write_bytes(b"")
    lmd = yaml.safe_load((RECIPES_DIR / "finetune_full-lmd-mxfp6.yaml").read_text())["lowprec"]
    (step / OPTIONS_FILE).write_text(yaml.safe_dump({"lowprec": lmd}))
    args = [str(default["checkpoint"]), "--config", "finetune_full-adamw", "--out_dir", str(out),
            "--resume", "true"]
    with pytest.raises(ConfigError, match=r"Cannot resume .*lowprec.optimizer: .*LMD"):
        run("finetune_full", args)

    errors, changes = resume_changes(lmd, LowPrecOptions.from_mapping({**lmd, "fmt": None}))
    assert errors == [] and changes == ["lowprec.fmt: 'mxfp6_e2m3' in the checkpoint, null now"]
    errors, _ = resume_changes(lmd, LowPrecOptions.from_mapping({**lmd, "multipliers": "paper"}))
    assert errors == ["lowprec.multipliers: null in the checkpoint, 'paper' now"]


def test_clipping_bounds_the_update_in_fine_tuning(default, tmp_path):
    """finetune_full clips nothing by itself; with lowprec.max_norm every step's gradient is
    clipped: plain SGD then moves the weights by at most sum(lr_t) * max_norm."""
    lr, max_norm = 0.5, 1e-3
    out = tmp_path / "out"
    recipe = REPO / "recipes" / "finetune_full-adamw.yaml"
    run("finetune_full", recipe_args(recipe, default, out) + [
        "--lowprec.optimizer", f"{{class_path: torch.optim.SGD, init_args: {{lr: {lr}}}}}",
        "--lowprec.max_norm", str(max_norm),
    ])
    before = torch.load(default["checkpoint"] / "lit_model.pth")
    after = torch.load(out / "final" / "lit_model.pth")["model"]
    moved = math.sqrt(sum(((after[k] - before[k]) ** 2).sum().item() for k in before))
    # litgpt's schedule over 3 steps with 1 warmup step: lr * (0, 1, 0.5).
    assert 0 < moved <= 1.5 * lr * max_norm * 1.001


def test_bf16_true_trains_and_saves_bf16_weights(default, tmp_path):
    """litgpt's --precision bf16-true becomes the plugin's param_dtype: the model is built in
    bf16 (init_module), trained there by LMD at samples, and saved in bf16."""
    out = tmp_path / "out"
    recipe = REPO / "recipes" / "finetune_full-lmd-mxfp6.yaml"
    summary = run("finetune_full", recipe_args(recipe, default, out) + [
        "--precision", "bf16-true", "--train.micro_batch_size", "1",
        "--train.global_batch_size", "1", "--train.max_seq_length", "32",
    ])
    assert summary["steps"] == STEPS
    weights = torch.load(out / "final" / "lit_model.pth")["model"]
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    initial = torch.load(default["checkpoint"] / "lit_model.pth")
    assert any(not torch.equal(initial[k].bfloat16(), weights[k]) for k in initial)
    assert all(torch.isfinite(w).all() for w in weights.values())


class RecordingSGD(torch.optim.SGD):
    """SGD that records every group's learning rate at each step, by group name."""

    seen: list[dict[str, float]] = []

    def step(self, closure=None):
        RecordingSGD.seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return super().step(closure)


@pytest.mark.parametrize("recipe", ["pretrain-adamw", "finetune_full-adamw"])
def test_multiplier_lr_ratio_holds_under_litgpts_schedule(recipe, default, tmp_path):
    """finetune_full's scheduler scales each group's own lr; pretrain sets one lr for all
    groups before every step, and the runner puts the ratio back for the step."""
    RecordingSGD.seen = []
    command = recipe.split("-")[0]
    run(command, recipe_args(REPO / "recipes" / f"{recipe}.yaml", default, tmp_path / "out") + [
        "--lowprec.optimizer", "{class_path: test_litgpt_runner.RecordingSGD, "
                               "init_args: {lr: 0.01}}",
        "--lowprec.multipliers", "paper", "--lowprec.param_groups", "{multiplier_lr_ratio: 3}",
    ])
    assert len(RecordingSGD.seen) == STEPS
    for lrs in RecordingSGD.seen:
        assert lrs["multipliers"] == pytest.approx(3 * lrs["matrices"])
    assert any(lrs["matrices"] > 0 for lrs in RecordingSGD.seen)


def test_check_litgpt_accepts_the_installed_litgpt_for_every_command():
    for command in patch.COMMANDS:
        patch.check_litgpt(command)


def test_check_litgpt_fails_loudly_when_litgpt_moves(monkeypatch):
    monkeypatch.setitem(patch._CALLS, "instantiate_torch_optimizer", "build_optimizer(")
    with pytest.raises(RuntimeError, match="no longer uses 'instantiate_torch_optimizer'"):
        patch.check_litgpt("finetune_full")
    monkeypatch.setattr(patch, "version", lambda name: "0.6.1")
    with pytest.raises(RuntimeError, match=r"supports litgpt>=0.5.13,<0.6; litgpt 0.6.1"):
        patch.check_litgpt("finetune_full")


def test_patched_names_are_restored_after_an_error():
    module = patch.recipe_module("pretrain")
    before = {name: getattr(module, name) for name in ("L", "torch", "save_hyperparameters")}
    with pytest.raises(KeyError), patch.patched(
        "pretrain", fabric=object, instantiate_optimizer=object, save_hyperparameters=object,
        compile_model=False, load_checkpoint=object,
    ) as patched_module:
        assert patched_module.torch.compile("model") == "model"
        assert patched_module.torch.nn is torch.nn
        raise KeyError
    assert {name: getattr(module, name) for name in before} == before


def test_split_args_strips_the_section_and_applies_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    section = {"fmt": "mxfp8_e4m3", "sample": False}
    recipe.write_text(yaml.safe_dump({"seed": 3, "lowprec": section}))
    (tmp_path / "tmp").mkdir()
    args, section = split_args(
        ["ckpt", "--config", str(recipe), "--lowprec.fmt=null", "--lowprec.max_norm", "0.5",
         "--train.max_steps", "2"], tmp_path / "tmp",
    )
    assert section == {"fmt": None, "sample": False, "max_norm": 0.5}
    # Config files first, so that the command line (the positional checkpoint too) wins.
    assert args[0] == "--config" and args[2:] == ["ckpt", "--train.max_steps", "2"]
    stripped = Path(args[1])
    assert yaml.safe_load(stripped.read_text()) == {"seed": 3}


LMD_TYPO = "{class_path: lightning_lowprec.LMD, init_args: {lrr: 1}}"
BAD_INPUT = [
    ("finetune_full", ["--lowprec.fmt", "mxfp5"],
     r"Invalid lowprec.fmt: 'mxfp5'. Valid values: null, 'mxfp8_e4m3'"),
    ("finetune_full", ["--lowprec.colour", "red"],
     r"Unknown key\(s\) in the lowprec section: colour. Valid keys: fmt"),
    ("finetune_full", ["--lowprec.multipliers", "everywhere"], r"Valid values: null, 'paper'"),
    ("finetune_full", ["--lowprec.optimizer", "{class_path: torch.optim.Nope}"],
     "cannot be imported"),
    ("finetune_full", ["--lowprec.optimizer", LMD_TYPO],
     "LMD does not accept lrr. Valid init_args:"),
    ("finetune_full", ["--lowprec.max_norm", "-1"], "max_norm must be a number > 0"),
    ("finetune_full", ["--lowprec.backend", "fp8"],
     r"Invalid lowprec.backend: 'fp8'. Valid values: 'auto', 'emulated', 'scaled_mm'"),
    ("finetune_full", ["--precision", "16-true"], r"--precision '16-true' is not supported"),
    ("finetune_full", ["--devices", "2"], "re-running this process's command line"),
    ("finetune_full", ["--lowprec.strategy", "fsdp1"],
     r"Invalid lowprec.strategy: 'fsdp1'. Valid values: 'fsdp2', 'ddp'"),
    ("finetune_full", ["--accelerator", "tpu"], r"Invalid lowprec.accelerator: 'tpu'. Valid"),
    ("finetune_lora", ["--lowprec.multipliers", "paper"], "does not combine with finetune_lora"),
    ("pretrain", ["--lowprec.max_norm", "1.0"], "pretrain clips gradients itself"),
    ("finetune_full", ["--lowprec", "{}"], "--lowprec.KEY VALUE"),
    ("finetune_full", ["--lowprec.fmt"], "--lowprec.fmt needs a value"),
    # Values, not only names: the optimizer is built on a dummy model first.
    ("finetune_full", ["--lowprec.optimizer", "{class_path: torch.optim.AdamW, init_args: "
                       "{lr: -1}}"], r"init_args.lr: -1. Valid values: a number > 0"),
    ("finetune_full", ["--lowprec.optimizer", "{class_path: lightning_lowprec.LMD, init_args: "
                       "{sigma: 2}}"], r"Invalid sigma: 2; expected a finite number in \[0.0, 1"),
    ("finetune_full", ["--lowprec.monitor", "{every_n_steps: 0}"],
     "every_n_steps must be a positive int"),
    # One optimizer trains, and the saved config must name it.
    ("finetune_full", ["--lowprec.optimizer", "{class_path: torch.optim.AdamW}",
                       "--optimizer", "SGD"], "both name the optimizer"),
    ("finetune_full", ["--lowprec.param_groups", "{multiplier_lr_ratio: 2}"],
     "param_groups .* needs lowprec.optimizer"),
    ("finetune_full", ["--train.max_steps", "10", "--train.lr_warmup_steps", "10"],
     "--train.lr_warmup_steps 10 must be smaller than the run's 10 optimizer steps"),
    ("finetune_lora", ["--train.lr_warmup_steps", "0"], "lr_warmup_steps 0 must be >= 1"),
    ("pretrain", ["--train.max_tokens", "4096", "--train.micro_batch_size", "4",
                  "--train.global_batch_size", "4", "--train.max_seq_length", "256",
                  "--train.lr_warmup_steps", "8"], "smaller than the run's 4 optimizer steps"),
    ("finetune_full", ["--config", "no-such-recipe"], "not a shipped recipe. Shipped recipes: "
                                                      "finetune_full-adamw"),
]


@pytest.mark.parametrize(("command", "extra", "message"), BAD_INPUT)
def test_bad_input_fails_before_training_with_the_valid_choices(command, extra, message, tmp_path):
    out = tmp_path / "out"
    positional = ["pythia-14m"] if command == "pretrain" else ["some/checkpoint"]
    with pytest.raises(ValueError, match=message):
        run(command, [*positional, "--out_dir", str(out), *extra])
    assert not out.exists()  # nothing started


def test_devices_auto_is_resolved_as_litgpt_does(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--devices 'auto' --num_nodes 1 \(2 processes\)"):
        run("pretrain", ["pythia-14m", "--devices", "auto", "--out_dir", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # CPU: auto is one device
    with pytest.raises(ConfigError, match="pretrain clips gradients itself"):
        run("pretrain", ["pythia-14m", "--devices", "auto", "--lowprec.max_norm", "1"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--lowprec.multipliers", "scalar"],
     "lowprec.multipliers 'scalar' with lowprec.strategy fsdp2 .* Use lowprec.multipliers "
     "'paper' or 'symmetry_free' .* or --lowprec.strategy ddp"),
    (["--train.global_batch_size", "8", "--train.micro_batch_size", "8"],
     "global_batch_size 8 over 2 devices is 4 per device, less than --train.micro_batch_size 8"
     ".* Set --train.micro_batch_size 4 or --train.global_batch_size 16"),
])
def test_multi_device_combinations_fail_before_any_process_starts(extra, message, monkeypatch,
                                                                   tmp_path):
    from lightning_lowprec.litgpt import runner

    monkeypatch.setattr(runner, "_FROM_CONSOLE", True)  # as under lowprec-litgpt
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        run("finetune_full", ["some/checkpoint", "--devices", "2", "--out_dir", str(out), *extra])
    assert not out.exists()


def test_accelerator_is_the_sections_key(tmp_path):
    """litgpt has no --accelerator: the runner takes it as lowprec.accelerator."""
    litgpt_args, section = split_args(["ckpt", "--accelerator", "cpu", "--devices", "2"], tmp_path)
    assert litgpt_args == ["ckpt", "--devices", "2"] and section == {"accelerator": "cpu"}


def test_litgpts_16_mixed_default_is_a_clear_error(monkeypatch):
    import litgpt.utils

    monkeypatch.setattr(litgpt.utils, "get_default_supported_precision", lambda **_: "16-mixed")
    with pytest.raises(ConfigError, match=r"default --precision on this machine is '16-mixed'"):
        run("finetune_full", ["some/checkpoint"])


def test_split_args_reads_values_as_litgpt_and_merges_nested_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lowprec:\n  optimizer:\n    class_path: torch.optim.AdamW\n"
                      "    init_args: {lr: 2e-5, weight_decay: 0.1}\n")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("lowprec:\n  optimizer: {init_args: {weight_decay: 0.0}}\n")
    (tmp_path / "tmp").mkdir()
    _, section = split_args(["--config", str(recipe), "--config", str(tiny),
                             "--lowprec.optimizer.init_args.betas", "[0.9, 0.95]",
                             "--lowprec.fmt", "null"], tmp_path / "tmp")
    assert section == {"fmt": None, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {
        "lr": 2e-5, "weight_decay": 0.0, "betas": [0.9, 0.95]}}}
    LowPrecOptions.from_mapping(section)  # a float lr, so it validates
    _, section = split_args(["--config", str(recipe), "--lowprec.optimizer.class_path",
                             "lightning_lowprec.LMD"], tmp_path / "tmp")
    assert section == {"optimizer": {"class_path": "lightning_lowprec.LMD"}}  # AdamW's args go


def test_a_config_error_prints_one_message_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune_full", "ckpt", "--lowprec.fmt", "mxfp5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lowprec-litgpt: error: Invalid lowprec.fmt: 'mxfp5'")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_help_is_plain_text_and_print_config_shows_the_section(capsys):
    main(["--help"])
    ours = capsys.readouterr().out
    main(["finetune_full", "--help"])
    litgpts, ours_too = capsys.readouterr().out.split("The lowprec section")
    assert "--train.max_steps" in litgpts and ours_too in ours
    assert "--lowprec.KEY VALUE" in ours and "quantize_backward" in ours
    assert "``" not in ours and ":class:" not in ours and ":data:" not in ours
    main(["finetune_full", "ckpt", "--config", "finetune_full-lmd-mxfp6", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lowprec"]["fmt"] == "mxfp6_e2m3"
    assert printed["optimizer"]["class_path"] == "lightning_lowprec.LMD"
    assert printed["checkpoint_dir"] == "ckpt"


def test_recipes_are_listed_printed_and_run_by_name(capsys, tmp_path):
    main(["recipes"])
    listing = capsys.readouterr().out
    assert all(path.stem in listing for path in RECIPES)
    main(["recipes", "finetune_full-lmd-mxfp6"])
    assert capsys.readouterr().out == (RECIPES_DIR / "finetune_full-lmd-mxfp6.yaml").read_text()
    with pytest.raises(SystemExit, match="2"):
        main(["recipes", "finetune_full-lmd-mxfp7"])
    assert "Shipped recipes: finetune_full-adamw" in capsys.readouterr().err
    (tmp_path / "tmp").mkdir()
    args, section = split_args(["--config", "finetune_full-lmd-mxfp6"], tmp_path / "tmp")
    assert section["fmt"] == "mxfp6_e2m3" and args[0] == "--config"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_the_recipes_are_set_up_for_real_models(recipe, capsys):
    """Parsed by litgpt's own parser as they ship (no tiny override): GPU precision, long
    sequences, intermediate checkpoints, and no smoke-run step limit."""
    command = recipe.stem.split("-")[0]
    positional = [] if command == "pretrain" else ["checkpoints/EleutherAI/pythia-1b"]
    main([command, *positional, "--config", recipe.stem, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["precision"] in ("bf16-mixed", "bf16-true")
    assert config["train"]["max_seq_length"] >= 512 and config["train"]["save_interval"] <= 500
    assert config["train"]["max_steps"] is None
    assert config["optimizer"] == config["lowprec"]["optimizer"]
    if "mplusadam-bf16" in recipe.stem:  # "no FP32 master" needs bf16 tensors
        assert config["precision"] == "bf16-true"
        assert config["lowprec"]["optimizer"]["init_args"]["rounding"] == "stochastic"


def test_the_recipes_are_package_data():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lightning_lowprec"]
    package = REPO / "lightning_lowprec"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert set(RECIPES) <= shipped and RECIPES_DIR.parent == package


def test_unknown_command_lists_the_supported_ones():
    supported = "lowprec-litgpt runs: finetune_full, finetune_lora, pretrain"
    with pytest.raises(ValueError, match=supported):
        run("finetune_adapter", [])
    with pytest.raises(SystemExit, match="2"):
        main(["chat"])


def test_backend_reaches_the_quantized_layers(default, tmp_path, monkeypatch):
    """lowprec.backend: scaled_mm makes the fine-tune's forwards run on torch._scaled_mm."""
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = REPO / "recipes" / "finetune_full-adamw.yaml"
    summary = run("finetune_full", recipe_args(recipe, default, tmp_path / "out") + [
        "--lowprec.fmt", "fp8_e4m3", "--lowprec.backend", "scaled_mm",
    ])
    assert summary["steps"] == STEPS and calls
