"""The main job (README command 1): a real LitGPT fine-tune, AdamW vs AdamW + MXFP6 vs LMD + MXFP6.

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

from lightning_lowprec.demo import COLUMNS, EVAL_FMT, RUNS, evaluate, format_table, run
from lightning_lowprec.litgpt.checkpoint import make_default

REPO = Path(__file__).resolve().parents[1]


def test_demo_fine_tunes_every_run_and_reports_the_table(tmp_path):
    out = tmp_path / "out"
    rows = run(steps=4, out_dir=out, default_dir=tmp_path / "default")
    assert [row["run"] for row in rows] == ["untrained (random init)", *RUNS]
    untrained, *trained = rows
    for row in trained:
        assert math.isfinite(row["response loss"]) and row["tokens/s"] > 0
        assert row["response loss"] < untrained["response loss"]  # four steps already help
        assert math.isfinite(row[f"response loss, {EVAL_FMT} eval"])
        assert list(Path(row["logs"]).rglob("events.out.tfevents.*"))  # TensorBoard
    assert json.loads((out / "results.json").read_text())[2]["run"] == "AdamW + MXFP6"
    table = format_table(rows)
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table.splitlines()) == 2 + len(rows)


def test_the_demo_scales_its_warm_up_with_the_steps(tmp_path, monkeypatch):
    """--steps 10 used to keep the recipe's warm-up of 10: litgpt's schedule divided by 0."""
    import lightning_lowprec.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_recipe", lambda command, args: calls.append(args) or {
        "tokens_per_second": 1.0, "train_seconds": 1.0})
    monkeypatch.setattr(demo, "evaluate", lambda *a: dict.fromkeys(demo.METRICS, 1.0))
    demo.run(steps=10, out_dir=tmp_path / "out", default_dir=tmp_path / "default", seeds=2)
    assert len(calls) == 2 * len(RUNS)
    for args in calls:
        warmup = int(args[args.index("--train.lr_warmup_steps") + 1])
        assert 1 <= warmup < 10 and args[args.index("--train.max_steps") + 1] == "10"
    assert {a[a.index("--seed") + 1] for a in calls} == {"1337", "1338"}
    table = format_table(json.loads((tmp_path / "out" / "results.json").read_text()))
    assert "1.000 (1.000–1.000)" in table  # the spread of the two seeds


def test_response_loss_leaves_the_prompt_out(tmp_path):
    """Scoring the prompt template (identical in every example) would reward memorising it:
    the response-only loss is its own number, and the quantized evaluation is another."""
    paths = make_default(tmp_path / "default")
    scores = evaluate(paths["checkpoint"], paths["instructions"])
    assert scores["response loss"] != scores["all-token loss"]
    assert scores[f"response loss, {EVAL_FMT} eval"] != scores["response loss"]


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
