"""The main job (README command 1): a real LitGPT fine-tune, baseline vs LMD + MXFP6, offline.

The in-process test runs it with a few steps; the fresh-machine test runs both README commands'
entry point, ``make demo``, in a copy of the repository with a new virtual environment — the
way a newcomer's clone runs it (``make test`` is what CI itself runs from a clean clone).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_lowprec.demo import COLUMNS, RUNS, format_table, run

REPO = Path(__file__).resolve().parents[1]


def test_demo_fine_tunes_both_runs_and_reports_the_table(tmp_path):
    out = tmp_path / "out"
    rows = run(steps=4, out_dir=out, default_dir=tmp_path / "default")
    assert [row["run"] for row in rows] == ["untrained (random init)", *RUNS]
    untrained, *trained = rows
    for row in trained:
        assert math.isfinite(row["val loss"]) and row["tokens/s"] > 0
        assert row["val loss"] < untrained["val loss"]  # four steps already help
        assert math.isclose(row["val perplexity"], math.exp(row["val loss"]), rel_tol=1e-6)
        assert list(Path(row["logs"]).rglob("events.out.tfevents.*"))  # TensorBoard
    assert json.loads((out / "results.json").read_text())[1]["run"] == "AdamW, fp32"
    table = format_table(rows)
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table.splitlines()) == 2 + len(rows)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_on_a_fresh_copy_of_the_repository(tmp_path):
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    copy = tmp_path / "clone"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(["make", "demo"], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| LMD + MXFP6, sampled |" in result.stdout
    assert list((copy / "out" / "demo").rglob("events.out.tfevents.*"))
