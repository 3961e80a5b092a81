"""The built-in default job: a LitGPT fine-tune, AdamW baseline vs LMD + MXFP6, on no downloads.

``python -m lightning_lowprec.demo`` (``make demo``):

1. builds the built-in default (:func:`~lightning_lowprec.litgpt.checkpoint.make_default`): a
   random-init LitGPT checkpoint (pythia-14m architecture, 4096-token BPE trained on the
   standard library's docstrings) and an instruction set made from the same docstrings;
2. runs ``lowprec-litgpt finetune_full`` twice on it, with ``recipes/finetune_full-adamw.yaml``
   (the baseline: fp32 matmuls, ``torch.optim.AdamW``) and
   ``recipes/finetune_full-lmd-mxfp6.yaml`` (LMD with posterior sampling, MXFP6 E2M3 forward
   matmuls), each with a progress bar and TensorBoard logs under ``out/demo/<run>/logs``;
3. evaluates every final checkpoint — plain LitGPT checkpoints, loaded into litgpt's own ``GPT``
   — on the held-out split and prints one table: validation loss and perplexity (torchmetrics),
   training tokens per second and the global L2 norm of the weight matrices.

The untrained checkpoint is the first row, for reference. Results also go to
``out/demo/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from lightning_lowprec.litgpt.checkpoint import DEFAULT_DIR, make_default
from lightning_lowprec.litgpt.runner import run as run_recipe

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RUNS: dict[str, str] = {
    "AdamW, fp32": "finetune_full-adamw.yaml",
    "LMD + MXFP6, sampled": "finetune_full-lmd-mxfp6.yaml",
}
"""The compared runs: table label -> recipe in ``recipes/``."""
COLUMNS = ("run", "val loss", "val perplexity", "tokens/s", "weight norm", "train s")
SEQ_LEN = 128


def evaluate(checkpoint_dir: Path, instructions: Path) -> dict[str, float]:
    """Validation loss and perplexity of a LitGPT checkpoint, and its weight-matrix norm.

    Perplexity is torchmetrics' ``Perplexity`` over every target token of the validation split
    (prompt included, as the recipes train), loss its logarithm. The weight norm is the global
    L2 norm of every parameter with two or more dimensions (matrices and embeddings).
    """
    from litgpt import GPT, Config, Tokenizer
    from litgpt.data import JSON
    from torchmetrics.text import Perplexity

    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    model = GPT(config)
    state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=False, map_location="cpu")
    model.load_state_dict(state.get("model", state))
    model.eval()
    data = JSON(json_path=instructions, num_workers=0)
    data.connect(tokenizer=Tokenizer(checkpoint_dir), batch_size=8, max_seq_length=SEQ_LEN)
    data.setup()
    perplexity = Perplexity(ignore_index=data.ignore_index)
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch["input_ids"])
            perplexity.update(logits[:, :-1].float(), batch["labels"][:, 1:])
    ppl = perplexity.compute().item()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in matrices]))
    return {"val loss": math.log(ppl), "val perplexity": ppl, "weight norm": norm.item()}


def run(
    steps: int | None = None,
    out_dir: Path = Path("out/demo"),
    default_dir: Path = DEFAULT_DIR,
    recipes_dir: Path = RECIPES_DIR,
) -> list[dict[str, Any]]:
    """Run the comparison; return the table's rows.

    Args:
        steps: optimizer steps per run; ``None`` keeps the recipes' (60).
        out_dir: one sub-directory per run, plus ``results.json``.
        default_dir: where the built-in default is made (reused when complete).
        recipes_dir: where the recipes are (the repository's ``recipes/``).
    """
    missing = [name for name in RUNS.values() if not (recipes_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Recipes {missing} not found in {recipes_dir}: run the demo from a clone of the "
            "repository (recipes/ is not part of the installed package)."
        )
    paths = make_default(default_dir)
    rows = [{"run": "untrained (random init)",
             **evaluate(paths["checkpoint"], paths["instructions"])}]
    for label, recipe in RUNS.items():
        run_dir = out_dir / Path(recipe).stem
        args = [str(paths["checkpoint"]), "--config", str(recipes_dir / recipe),
                "--data.json_path", str(paths["instructions"]), "--out_dir", str(run_dir)]
        if steps is not None:
            args += ["--train.max_steps", str(steps)]
        summary = run_recipe("finetune_full", args)
        rows.append({
            "run": label,
            **evaluate(run_dir / "final", paths["instructions"]),
            "tokens/s": summary["tokens_per_second"],
            "train s": summary["train_seconds"],
            "logs": str(run_dir / "logs"),
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-markdown table of ``rows`` over :data:`COLUMNS`."""

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        return f"{value:,.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--out-dir", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    rows = run(args.steps, args.out_dir)
    print()
    print(format_table(rows))
    print(f"\nTensorBoard: tensorboard --logdir {args.out_dir}")
    print(f"Results: {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
