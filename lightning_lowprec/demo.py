"""The built-in default job: a LitGPT fine-tune, AdamW vs AdamW + MXFP6 vs LMD + MXFP6, offline.

``python -m lightning_lowprec.demo`` (``make demo``):

1. builds the built-in default (:func:`~lightning_lowprec.litgpt.checkpoint.make_default`): a
   random-init LitGPT checkpoint (pythia-14m architecture, 4096-token BPE trained on the
   standard library's docstrings) and an instruction set made from the same docstrings;
2. runs ``lowprec-litgpt finetune_full`` three times on it (:data:`RUNS`): the
   ``finetune_full-adamw`` recipe (fp32 matmuls, ``torch.optim.AdamW``), the same with MXFP6
   E2M3 forward matmuls (the format changed alone), and ``finetune_full-lmd-mxfp6`` (LMD with
   posterior sampling, MXFP6: the optimizer changed too) — each with the ``tiny-finetune``
   override and the learning rate measured on this default
   (:func:`~lightning_lowprec.litgpt.recipes.tiny_overrides`), a progress bar and TensorBoard
   logs under ``out/demo/<run>/logs``;
3. evaluates every final checkpoint — plain LitGPT checkpoints, loaded into litgpt's own ``GPT``
   — on the held-out split and prints one table.

What the table measures: the loss on the **responses only** (litgpt's ``mask_prompt``: the
instruction template is masked out, as it is in training), whose tokens a model has to predict
from the instruction; the all-token loss, which is mostly the fixed template, is a column beside
it. Each checkpoint is evaluated both ways: as saved (unquantized fp32 matmuls, what ``litgpt
generate`` runs) and with MXFP6 forward matmuls (what the MXFP6 runs trained under). With
``--seeds N`` every run repeats with N seeds (litgpt's ``--seed``: data order and LMD's samples)
and each cell shows the mean and the spread (min–max).

The untrained checkpoint is the first row, for reference. Results also go to
``out/demo/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from lightning_lowprec.litgpt.checkpoint import DEFAULT_DIR, make_default
from lightning_lowprec.litgpt.recipes import tiny_overrides
from lightning_lowprec.litgpt.runner import run as run_recipe

EVAL_FMT = "mxfp6_e2m3"
"""The format of the quantized evaluation (the MXFP6 runs' training format)."""
RUNS: dict[str, tuple[str, list[str]]] = {
    "AdamW, fp32": ("finetune_full-adamw", []),
    "AdamW + MXFP6": ("finetune_full-adamw", ["--lowprec.fmt", EVAL_FMT]),
    "LMD + MXFP6, sampled": ("finetune_full-lmd-mxfp6", []),
}
"""The compared runs: table label -> (shipped recipe, extra arguments)."""
METRICS = ("response loss", f"response loss, {EVAL_FMT} eval", "all-token loss", "weight norm")
COLUMNS = ("run", "seeds", *METRICS, "tokens/s", "train s")
SEQ_LEN = 128
RECIPE_STEPS, RECIPE_WARMUP = 60, 10
"""tiny-finetune's steps and warm-up; ``--steps`` scales the warm-up in the same ratio."""
SEED = 1337


def evaluate(checkpoint_dir: Path, instructions: Path) -> dict[str, float]:
    """Validation losses of a LitGPT checkpoint, and its weight-matrix norm.

    Losses are mean cross-entropies per scored token (nats) over the validation split: on the
    response tokens (the prompt masked as litgpt's ``mask_prompt`` does) with the checkpoint as
    saved and with :data:`EVAL_FMT` forward matmuls (every Linear but the LM head, as the
    plugin quantizes by default), and on every target token (prompt included). The weight norm
    is the global L2 norm of every parameter with two or more dimensions.
    """
    from litgpt import GPT, Config

    from lightning_lowprec import quantize_linears

    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    model = GPT(config)
    state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=False, map_location="cpu")
    model.load_state_dict(state.get("model", state))
    model.eval()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in matrices]))
    out = {
        "response loss": _loss(model, checkpoint_dir, instructions, mask_prompt=True),
        "all-token loss": _loss(model, checkpoint_dir, instructions, mask_prompt=False),
        "weight norm": norm.item(),
    }
    quantize_linears(model, EVAL_FMT)
    out[f"response loss, {EVAL_FMT} eval"] = _loss(
        model, checkpoint_dir, instructions, mask_prompt=True
    )
    return out


def _loss(model: Any, checkpoint_dir: Path, instructions: Path, mask_prompt: bool) -> float:
    from litgpt import Tokenizer
    from litgpt.data import JSON

    data = JSON(json_path=instructions, mask_prompt=mask_prompt, num_workers=0)
    data.connect(tokenizer=Tokenizer(checkpoint_dir), batch_size=8, max_seq_length=SEQ_LEN)
    data.setup()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch["input_ids"])[:, :-1].float()
            targets = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=data.ignore_index,
                reduction="sum",
            ).item()
            count += (targets != data.ignore_index).sum().item()
    return total / count


def run(
    steps: int | None = None,
    out_dir: Path = Path("out/demo"),
    default_dir: Path = DEFAULT_DIR,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """Run the comparison; return the table's rows (cells: means over the seeds; each row's
    ``"per_seed"`` holds the single runs).

    Args:
        steps: optimizer steps per run; ``None`` keeps tiny-finetune's (60). The warm-up keeps
            its share of the steps (10 of 60).
        out_dir: one sub-directory per run (and seed), plus ``results.json``.
        default_dir: where the built-in default is made (reused when complete).
        seeds: runs per configuration, with seeds 1337, 1338, ...
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}.")
    if steps is not None and steps < 2:
        raise ValueError(f"steps must be >= 2 (one of warm-up, one of decay), got {steps!r}.")
    paths = make_default(default_dir)
    untrained = evaluate(paths["checkpoint"], paths["instructions"])
    rows = [{"run": "untrained (random init)", "seeds": "—", **untrained, "per_seed": [untrained]}]
    for label, (recipe, extra) in RUNS.items():
        per_seed = []
        for seed in range(SEED, SEED + seeds):
            name = f"{recipe}{'-' + extra[-1] if extra else ''}"
            run_dir = out_dir / (name if seeds == 1 else f"{name}-seed{seed}")
            args = [str(paths["checkpoint"]), "--config", recipe, *tiny_overrides(recipe),
                    "--data.json_path", str(paths["instructions"]), "--out_dir", str(run_dir),
                    "--seed", str(seed), *extra]
            if steps is not None:
                warmup = max(1, min(steps - 1, round(steps * RECIPE_WARMUP / RECIPE_STEPS)))
                args += ["--train.max_steps", str(steps), "--train.lr_warmup_steps", str(warmup)]
            summary = run_recipe("finetune_full", args)
            per_seed.append({
                **evaluate(run_dir / "final", paths["instructions"]),
                "tokens/s": summary["tokens_per_second"],
                "train s": summary["train_seconds"],
                "logs": str(run_dir / "logs"),
            })
        means = {key: statistics.fmean(r[key] for r in per_seed)
                 for key in (*METRICS, "tokens/s", "train s")}
        rows.append({"run": label, "seeds": seeds, **means, "per_seed": per_seed,
                     "logs": per_seed[0]["logs"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-markdown table of ``rows`` over :data:`COLUMNS`; with several seeds the loss
    cells show ``mean (min–max)``."""

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return "—"
        if not isinstance(value, float):
            return str(value)
        text = f"{value:,.3g}" if column in ("tokens/s", "train s") else f"{value:.3f}"
        runs = [r[column] for r in row.get("per_seed", []) if column in r]
        if len(runs) > 1 and column in METRICS and all(math.isfinite(v) for v in runs):
            text += f" ({min(runs):.3f}–{max(runs):.3f})"
        return text

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, c) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=1, help="runs per configuration")
    parser.add_argument("--out-dir", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    rows = run(args.steps, args.out_dir, seeds=args.seeds)
    print()
    print(format_table(rows))
    print(
        f"\nLosses in nats per token of the held-out responses (prompt masked), the checkpoint "
        f"as saved (unquantized) and with {EVAL_FMT} forward matmuls; all-token: prompt "
        "included (mostly the fixed instruction template)."
    )
    print(f"TensorBoard: tensorboard --logdir {args.out_dir}")
    print(f"Results: {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
