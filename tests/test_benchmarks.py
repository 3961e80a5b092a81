"""The benchmark entry points in their ``--quick`` modes: they run end to end and their JSON
holds real measurements (the quality suite trains: losses finite and falling; the speed table
has every section with positive times)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~2 min in all: each entry point trains or times in subprocesses


def run_module(module: str, out: Path, *args: str) -> str:
    """``python -m <module> --quick --out <out>`` from the repository root; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def quality(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("quality")
    stdout = run_module("benchmarks.quality", out)
    return json.loads((out / "quality.json").read_text()), out, stdout


def test_quality_quick_has_every_cell_and_trains(quality):
    from benchmarks.quality import EXPERIMENTS, QUICK_CELLS

    summary, _, stdout = quality
    assert set(summary["cells"]) == set(QUICK_CELLS)
    for title, names in summary["experiments"].items():
        assert names == [n for n in EXPERIMENTS[title] if n in QUICK_CELLS]
        assert names, f"experiment {title!r} has no cell in --quick"
    assert summary["size"]["seeds"] == 1
    for name, cell in summary["cells"].items():
        assert cell["finite"], name
        assert math.isfinite(cell["val_loss_mean"]), name
        # From ln(256) = 5.55 nats at init; 40 steps of the tiny model reach about 3 (Madam 4).
        assert cell["val_loss_mean"] < cell["init_val_loss"] - 0.5, name
        assert cell["wall_s_mean"] > 0 and cell["ms_per_step_mean"] > 0
        steps = [s for s, _ in cell["norm_curve"]]
        assert steps[0] == 0 and steps[-1] == summary["size"]["steps"]
    assert set(summary["best_lr"]) == {"adamw", "madam", "lmd", "mplus"}
    for opt, lr in summary["best_lr"].items():
        assert lr in summary["lr_grid"][opt]
    assert "LMD MXFP6: point estimate - sampled" in summary["paired_deltas"]
    assert "| adamw/fp32 |" in stdout


def test_quality_quick_writes_plots_and_resumes(quality):
    summary, out, _ = quality
    for name in summary["plots"]:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(summary["plots"]) == 3
    runs = sorted((out / "runs").glob("*/*.json"))
    assert len(runs) >= len(summary["cells"])
    # A second invocation finds every run cached: nothing is trained again.
    stdout = run_module("benchmarks.quality", out)
    assert not re.search(r"^\s+\[\d+/\d+\]", stdout, re.MULTILINE), stdout[:2000]
    assert json.loads((out / "quality.json").read_text())["cells"].keys() == summary[
        "cells"
    ].keys()


def test_speed_quick_collects_every_section(tmp_path):
    from benchmarks.train_step import PEER, QUICK_CONFIGS

    stdout = run_module("benchmarks", tmp_path)
    payload = json.loads((tmp_path / "benchmarks.json").read_text())
    rows = payload["rows"]
    assert {r["benchmark"] for r in rows} == {"quantize", "linear", "optim", "train_step"}
    # As benchmarks.quantize: glibc keeps freed memory, and both JSONs say so.
    assert payload["reuse_freed_memory"] is True
    assert json.loads((tmp_path / "quantize.json").read_text())["reuse_freed_memory"] is True
    assert all(r["ms"] > 0 for r in rows)
    train = {r["case"]: r for r in rows if r["benchmark"] == "train_step"}
    assert set(train) == set(QUICK_CONFIGS)
    assert train[PEER]["x peer"] == pytest.approx(1.0)
    for r in train.values():
        assert r["peak RSS MB"] > 100 and r["tokens/s"] > 0
    # LMD keeps 12 bytes of state per parameter in its matrices (AdamW 8).
    assert train["MXFP6 + LMD sampled"]["state B/param"] > train[PEER]["state B/param"] > 7
    optim = {r["case"]: r for r in rows if r["benchmark"] == "optim"}
    assert {"AdamW fused step", "LMD foreach step", "LMD foreach sample+step"} <= set(optim)
    assert all(r["x peer"] > 0 and r["state B/param"] > 0 for r in optim.values())
    assert "| train_step |" in stdout
    assert (tmp_path / "optim.json").is_file() and (tmp_path / "train_step.json").is_file()
    assert (tmp_path / "speed_ratios.png").read_bytes()[:4] == b"\x89PNG"


def test_fsdp_quick_measures_every_optimizer_per_rank(tmp_path):
    """FSDP2 holds about half of DDP's parameter + state bytes per rank on 2 ranks."""
    stdout = run_module("benchmarks.fsdp", tmp_path)
    rows = json.loads((tmp_path / "fsdp.json").read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["AdamW", "LMD", "M+Adam", "Madam"]
    for r in rows:
        assert r["DDP params MB"] > 0 and r["DDP state MB"] > 0, r
        assert 0.45 < r["x DDP"] <= 0.55 and r["target"] == "met", r
        assert set(r["bytes_per_rank"]) == {"rank0", "rank1"}
    assert "| LMD |" in stdout
