"""`litgpt finetune_full --optimizer '{"class_path": "lightning_lowprec.LMD", ...}'` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lowprec.litgpt.checkpoint import make_checkpoint, write_instruction_data

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "init_args"), [
    ("LMD", {"lr": 0.003, "sigma": 0.05, "weight_decay": 0.1}),
    ("MPlusAdam", {"lr": 0.003, "storage": "bf16"}),
])
def test_litgpt_finetune_full_with_our_optimizer(tmp_path, cls, init_args):
    checkpoint = make_checkpoint(tmp_path / "pythia-14m-random")
    data = write_instruction_data(tmp_path / "instructions.json", examples=64)
    out = tmp_path / "out"
    optimizer = json.dumps({"class_path": f"lightning_lowprec.{cls}", "init_args": init_args})
    command = [
        sys.executable, "-m", "litgpt", "finetune_full", str(checkpoint),
        "--data", "JSON", "--data.json_path", str(data), "--data.val_split_fraction", "0.1",
        "--data.num_workers", "0",
        "--train.max_steps", "4", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2", "--train.max_seq_length", "64",
        "--train.lr_warmup_steps", "1", "--eval.initial_validation", "false",
        "--eval.final_validation", "false", "--precision", "32-true",
        "--out_dir", str(out), "--optimizer", optimizer,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split("loss train: ")[1].split(",")[0])
              for line in result.stdout.splitlines() if "loss train:" in line]
    assert len(losses) == 8 and losses[-1] < losses[0]
    before = torch.load(checkpoint / "lit_model.pth")
    after = torch.load(out / "final" / "lit_model.pth")["model"]
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
