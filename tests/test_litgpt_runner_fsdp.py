"""``lowprec-litgpt finetune_full ... --devices 2 --accelerator cpu``: FSDP2 or DDP, 2 processes.

Each run is a real console run (``python -m lightning_lowprec.litgpt``): Lightning starts the
second process by re-running the command line. The recipe is the hardest fine-tuning one (LMD
with posterior sampling, MXFP6 forward matmuls, clipping, the monitor) on the built-in default,
for 2 optimizer steps of 2 x 4 sequences. What must hold: the run used FSDP2
(``ModelParallelStrategy``), its outputs are full litgpt checkpoints that a fresh ``litgpt.GPT``
loads with ``strict=True``, ``--resume`` from the step-1 checkpoint reaches the uninterrupted
run's weights bit for bit, and ``--lowprec.strategy ddp`` trains the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lowprec.litgpt.checkpoint import make_default
from lightning_lowprec.litgpt.recipes import tiny_overrides
from lightning_lowprec.litgpt.runner import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
RECIPE = "finetune_full-lmd-mxfp6"
STEPS = 2
DDP_TOLERANCE = 1e-5
"""FSDP2 vs DDP, absolute, on weights of order 1: the runs differ only in the order of the
global gradient norm's sum (per shard then over ranks, or over the whole tensor), so the
clipping factor differs in its last bits (measured: at most 1.2e-7, one ulp of a norm's
weight). A different sample, batch or update would differ by ~lr = 3e-3."""

pytestmark = pytest.mark.slow  # each run: two processes start, import litgpt, train: 15-60 s


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[str, Path]:
    return make_default(tmp_path_factory.mktemp("lowprec-default"))


def launch(default: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m lightning_lowprec.litgpt finetune_full`` on 2 CPU processes."""
    args = [
        str(default["checkpoint"]), "--config", RECIPE, *tiny_overrides(RECIPE),
        "--data.json_path", str(default["instructions"]), "--out_dir", str(out),
        "--devices", "2", "--accelerator", "cpu",
        "--train.micro_batch_size", "4", "--train.max_steps", str(STEPS),
        "--train.save_interval", "1", "--train.lr_warmup_steps", "1",
        "--eval.max_iters", "1", "--eval.max_new_tokens", "4",
        # A fixed seed: otherwise drawn from torch's generator, whose state at the optimizer's
        # construction depends on how the strategy builds the model.
        "--lowprec.optimizer.init_args.seed", "3", "--lowprec.progress_bar", "false", *extra,
    ]
    return console("finetune_full", args, out)


def console(command: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    """``python -m lightning_lowprec.litgpt COMMAND ARGS``, as a user starts it; must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_lowprec.litgpt", command, *args],
        env=env, capture_output=True, text=True, timeout=900, cwd=out.parent,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["model"]


@pytest.fixture(scope="module")
def fsdp2(default, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp2") / "out"
    return out, launch(default, out).stdout


def test_the_run_is_fsdp2_and_its_output_loads_strictly(fsdp2, default):
    from litgpt import GPT, Config

    out, stdout = fsdp2
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["strategy"] == "ModelParallelStrategy" and summary["world_size"] == 2
    assert summary["steps"] == STEPS and summary["lowprec"]["strategy"] == "fsdp2"
    assert "strategy ModelParallelStrategy (fsdp2, 2 processes)" in stdout
    # Tokens of both processes: 2 steps x 2 ranks x 4 sequences of at most 128 tokens.
    assert STEPS * 2 * 4 < summary["tokens"] <= STEPS * 2 * 4 * 128

    final = out / "final"
    trained = weights(final / "lit_model.pth")
    model = GPT(Config.from_file(final / "model_config.yaml"))
    model.load_state_dict(trained, strict=True)  # full, plain: what litgpt generate loads
    initial = torch.load(default["checkpoint"] / "lit_model.pth")
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert all(torch.isfinite(w).all() for w in trained.values())
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) == len(initial)  # every tensor trained, not only rank 0's shards

    # The resumable checkpoint holds the full (gathered) optimizer state, by parameter name.
    step = torch.load(out / "step-000001" / "lit_model.pth", weights_only=False)
    state = step["optimizer"]["state"]["transformer.h.0.mlp.fc.weight"]
    assert state["momentum"].shape == initial["transformer.h.0.mlp.fc.weight"].shape
    assert step["step_count"] == 1


def test_resume_reaches_the_uninterrupted_weights_bit_for_bit(fsdp2, default, tmp_path):
    whole, _ = fsdp2
    resumed = tmp_path / "resumed"
    launch(default, resumed, "--resume", str(whole / "step-000001" / "lit_model.pth"))
    a, b = weights(whole / "final" / "lit_model.pth"), weights(resumed / "final" / "lit_model.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((resumed / SUMMARY_FILE).read_text())
    assert summary["steps"] == STEPS and summary["sessions"] == 2
    assert summary["session"]["steps"] == STEPS - 1


def test_ddp_trains_the_same_weights(fsdp2, default, tmp_path):
    sharded, _ = fsdp2
    out = tmp_path / "ddp"
    stdout = launch(default, out, "--lowprec.strategy", "ddp").stdout
    assert json.loads((out / SUMMARY_FILE).read_text())["strategy"] == "DDPStrategy"
    assert "strategy DDPStrategy (ddp, 2 processes)" in stdout
    a, b = weights(sharded / "final" / "lit_model.pth"), weights(out / "final" / "lit_model.pth")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=DDP_TOLERANCE, msg=key)


def load_on_rank(rank: int, checkpoint: str) -> None:
    """The runner's ``load_checkpoint`` under FSDP2 puts every base tensor into the shards
    exactly: into ``litgpt.GPT`` (strict), into one with the paper's multipliers (strict: the
    raw weights take the checkpoint's, the multipliers start at 1, as the layers' load hook
    does on one device) and into litgpt's LoRA GPT, whose ``.linear.weight`` takes the
    checkpoint's ``.weight`` (litgpt's own FSDP2 branch renames every key so, which fails for
    the plain GPT of ``finetune_full``)."""
    import lightning as L
    import litgpt
    import litgpt.lora
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import LowPrecision
    from lightning_lowprec.litgpt.runner import distributed_strategy, load_checkpoint
    from lightning_lowprec.multipliers import add_multipliers

    strategy = distributed_strategy("fsdp2", 2)
    assert isinstance(strategy, ModelParallelStrategy)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy,
                      plugins=[LowPrecision("mxfp6_e2m3")])
    fabric.launch()
    path = Path(checkpoint)
    base = torch.load(path / "lit_model.pth")
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_query": True, "lora_value": True,
            "lora_head": True}
    for gpt, config, extra, strict, multiplied in (
        (litgpt.GPT, litgpt.Config, {}, True, False),
        (litgpt.GPT, litgpt.Config, {}, True, True),
        (litgpt.lora.GPT, litgpt.lora.Config, lora, False, False),
    ):
        module = gpt(config.from_file(path / "model_config.yaml", **extra))
        if multiplied:
            add_multipliers(module, placement="paper")
        model = fabric.setup_module(module)
        load_checkpoint(fabric, model, path / "lit_model.pth", strict=strict)
        loaded = {k: v.full_tensor() for k, v in module.state_dict().items()}
        for key, value in base.items():
            prefix, _, name = key.rpartition(".")
            target = next(k for k in (key, f"{prefix}.linear.{name}",
                                      f"{prefix}.parametrizations.weight.original") if k in loaded)
            assert torch.equal(loaded[target], value), (gpt.__module__, multiplied, key)
        factors = [v for k, v in loaded.items() if k.endswith("_multiplier")]
        assert len(factors) == (50 if multiplied else 0)  # 2 x 25 layers (paper: all but head)
        assert all(torch.equal(f, torch.ones_like(f)) for f in factors)  # they start at 1


def test_the_base_checkpoint_loads_into_the_shards_exactly(default, tmp_path):
    from file_spawn import spawn

    spawn(load_on_rank, tmp_path, str(default["checkpoint"]))


def pretrain_multipliers(default: dict[str, Path], out: Path, *extra: str) -> None:
    """``pretrain`` with LMD, MXFP4 and the paper's multipliers, 2 steps of 2 x 4 sequences of
    128 tokens on 2 processes, a checkpoint every step."""
    recipe = "pretrain-lmd-mxfp4-multipliers"
    console("pretrain", [
        "--config", recipe, *tiny_overrides(recipe), "--out_dir", str(out),
        "--tokenizer_dir", str(default["checkpoint"]),
        "--data.train_data_path", str(default["text_train"]),
        "--data.val_data_path", str(default["text_val"]),
        "--devices", "2", "--accelerator", "cpu",
        "--train.micro_batch_size", "4", "--train.max_tokens", str(STEPS * 8 * 128),
        "--train.save_interval", "1", "--train.lr_warmup_steps", "1",
        "--eval.interval", "1000", "--eval.max_iters", "1",
        "--lowprec.optimizer.init_args.seed", "3", "--lowprec.progress_bar", "false", *extra,
    ], out)


def test_pretrain_with_multipliers_saves_merged_checkpoints_and_resumes_exactly(default,
                                                                               tmp_path):
    """FSDP2's full checkpoints go through FabricMergeMultipliers: the merged weights load into
    a fresh litgpt.GPT with strict=True and compute the multiplied model's logits, and
    --resume un-merges them into the shards, reaching the uninterrupted run bit for bit."""
    from litgpt import GPT, Config

    from lightning_lowprec.callbacks import FACTORS_KEY, unmerge_checkpoint
    from lightning_lowprec.multipliers import add_multipliers

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pretrain_multipliers(default, whole)
    summary = json.loads((whole / SUMMARY_FILE).read_text())
    assert summary["strategy"] == "ModelParallelStrategy" and summary["steps"] == STEPS
    final = whole / "final"
    checkpoint = torch.load(final / "lit_model.pth", weights_only=False)
    assert FACTORS_KEY in checkpoint
    config = Config.from_file(final / "model_config.yaml")
    plain = GPT(config)
    plain.load_state_dict(checkpoint["model"], strict=True)
    multiplied = GPT(config)
    add_multipliers(multiplied, placement="paper")
    unmerged = unmerge_checkpoint(checkpoint)["model"]
    multiplied.load_state_dict(unmerged, strict=True)
    trained = [v for k, v in unmerged.items() if k.endswith("_multiplier")]
    assert trained and any(not torch.equal(m, torch.ones_like(m)) for m in trained)
    tokens = torch.randint(0, config.padded_vocab_size, (2, 16), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():  # the merge computes W_eff as the forward does: bit for bit
        assert torch.equal(plain(tokens), multiplied(tokens))

    pretrain_multipliers(default, resumed,
                         "--resume", str(whole / "step-00000001" / "lit_model.pth"))
    a = torch.load(final / "lit_model.pth", weights_only=False)
    b = torch.load(resumed / "final" / "lit_model.pth", weights_only=False)
    for part in ("model", FACTORS_KEY):
        flat_a, flat_b = _flat(a[part]), _flat(b[part])
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
