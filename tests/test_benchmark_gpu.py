"""``benchmarks/gpu.py`` on a machine without CUDA: it runs, skips every GPU row and the CUDA
tests clearly, and writes its JSON; with ``--device cpu`` every row runs through real code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import CONFIGS, NO_CUDA, OPT_PEER, OPTIMIZERS, PEER

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_check(out: Path, *args: str) -> tuple[dict, str]:
    """``python -m benchmarks.gpu --quick --out <out> ...`` with no GPU visible."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "gpu.json").read_text()), done.stdout


def test_without_cuda_every_gpu_row_is_skipped_clearly(tmp_path):
    payload, stdout = run_gpu_check(tmp_path)
    assert payload["tests"]["status"] == NO_CUDA and payload["device"] == NO_CUDA
    rows = payload["rows"]
    assert [r["case"] for r in rows] == [*CONFIGS, *OPTIMIZERS]
    assert all(r["status"] == NO_CUDA and "ms" not in r for r in rows)
    assert stdout.count(f"| {NO_CUDA} |") == len(rows)
    assert "CUDA tests: " + NO_CUDA in stdout


@pytest.mark.slow
def test_on_cpu_every_row_runs(tmp_path):
    """``--device cpu``: the same code paths measured (pythia-14m, about 2 minutes)."""
    payload, stdout = run_gpu_check(tmp_path, "--device", "cpu", "--no-tests")
    rows = {r["case"]: r for r in payload["rows"]}
    assert set(rows) == {*CONFIGS, *OPTIMIZERS}
    for name, row in rows.items():
        assert row["status"] == "measured" and row["ms"] > 0, (name, row)
    assert rows[PEER]["x peer"] == pytest.approx(1.0)
    assert rows[OPT_PEER]["x peer"] == pytest.approx(1.0)
    assert all(rows[name]["tokens/s"] > 0 for name in CONFIGS)
    assert "| train step | fp8_e4m3 scaled_mm + fused AdamW | measured |" in stdout
