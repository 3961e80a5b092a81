"""Bayesian model averaging over LMD's posterior vs its point estimate: validation NLL and ECE.

The demo's LMD run, reproduced as a Fabric loop so that the optimizer (the posterior) is at
hand after training: the built-in default (``make_default``: pythia-14m-shaped GPT, 4096-token
BPE, random init), fine-tuned on its instruction set with
``recipes/finetune_full-lmd-mxfp6.yaml``'s settings — LMD (lr 0.03, sigma 0.05, weight decay
0.1) on ``param_groups``, ``LowPrecision("mxfp6_e2m3")`` with posterior sampling, gradient
clipping at 1.0, litgpt's warm-up + cosine schedule, 60 steps of 8 x 128 tokens — once per seed.

Then, on the held-out split (response tokens only: the prompt template is memorised and would
dominate every number), the point estimate's softmax is compared with
:func:`~lightning_lowprec.predictive.posterior_predict` over ``S`` = 1, 4, 16 posterior draws,
each quantized by the plugin's layers as in training. Columns: mean negative log-likelihood
(nats per token), expected calibration error (15 equal-width bins of the top-1 probability,
``sum_b n_b / n * |accuracy_b - confidence_b|``), top-1 accuracy; mean ± sample std over the
seeds, and the paired difference to the point estimate.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bma [--seeds 0 1 2] [--steps 60] [--sigma 0.05]``.
Prints a table; writes ``benchmarks/results/bma.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.timing import RESULTS_DIR, print_table, write_json
from lightning_lowprec import LMD, LowPrecision
from lightning_lowprec.optim import param_groups
from lightning_lowprec.predictive import posterior_predict

SAMPLES = (1, 4, 16)
BINS = 15
SEQ_LEN, BATCH = 128, 8
COLUMNS = ["predictor", "NLL", "NLL - point", "ECE", "ECE - point", "accuracy"]


def data(instructions: Path, tokenizer, mask_prompt: bool):
    from litgpt.data import JSON

    module = JSON(json_path=instructions, num_workers=0, mask_prompt=mask_prompt)
    module.connect(tokenizer=tokenizer, batch_size=BATCH, max_seq_length=SEQ_LEN)
    module.setup()
    return module


def train(seed: int, steps: int, sigma: float, checkpoint: Path, instructions: Path):
    """The demo's LMD + MXFP6 fine-tune as a Fabric loop; returns (module, optimizer)."""
    from litgpt import GPT, Config, Tokenizer
    from litgpt.finetune.full import get_lr_scheduler

    L.seed_everything(seed, verbose=False)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision("mxfp6_e2m3")])
    gpt = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    gpt.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True))
    optimizer = LMD(param_groups(gpt, 0.1), lr=0.03, sigma=sigma, weight_decay=0.1, seed=seed)
    model, optimizer = fabric.setup(gpt, optimizer)
    # The recipe's 10 warm-up steps of 60, scaled with --steps.
    scheduler = get_lr_scheduler(optimizer, warmup_steps=max(1, steps // 6), max_steps=steps)
    loader = data(instructions, Tokenizer(checkpoint), mask_prompt=False).train_dataloader()
    step = 0
    while step < steps:
        for batch in loader:
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=-100)
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step == steps:
                break
    return model.module, optimizer.optimizer


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token NLL, top-1 confidence and correctness of next-token probabilities."""
    probs, labels = probs[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = labels != -100
    probs, labels = probs[keep], labels[keep]
    confidence, prediction = probs.max(-1)
    nll = -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-30).log()
    return {"nll": nll, "confidence": confidence, "correct": (prediction == labels).float()}


def summarise(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    nll, confidence, correct = (torch.cat([p[k] for p in parts]) for k in
                                ("nll", "confidence", "correct"))
    bins = (confidence * BINS).long().clamp_max(BINS - 1)
    ece = 0.0
    for b in bins.unique():
        members = bins == b
        gap = (correct[members].mean() - confidence[members].mean()).abs()
        ece += members.float().mean().item() * gap.item()
    return {"NLL": nll.mean().item(), "ECE": ece, "accuracy": correct.mean().item(),
            "tokens": len(nll)}


def evaluate(module, optimizer, checkpoint: Path, instructions: Path) -> dict[str, dict]:
    from litgpt import Tokenizer

    loader = data(instructions, Tokenizer(checkpoint), mask_prompt=True).val_dataloader()
    parts: dict[str, list] = {"point estimate": [], **{f"BMA S={s}": [] for s in SAMPLES}}
    module.eval()
    for batch in loader:
        x, labels = batch["input_ids"], batch["labels"]
        with torch.no_grad():
            parts["point estimate"].append(scores(torch.softmax(module(x).float(), -1), labels))
        for s in SAMPLES:
            probs = posterior_predict(module, optimizer, x, samples=s)
            parts[f"BMA S={s}"].append(scores(probs, labels))
    return {name: summarise(p) for name, p in parts.items()}


def table(per_seed: list[dict[str, dict]]) -> list[dict]:
    rows = []
    for name in per_seed[0]:
        row = {"predictor": name}
        for metric in ("NLL", "ECE", "accuracy"):
            values = [seed[name][metric] for seed in per_seed]
            row[metric] = _mean_std(values)
            if metric != "accuracy":
                deltas = [seed[name][metric] - seed["point estimate"][metric] for seed in per_seed]
                row[f"{metric} - point"] = _mean_std(deltas, signed=True)
            row[f"{metric} values"] = values
        rows.append(row)
    return rows


def _mean_std(values: list[float], signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.4f} ± {std:.4f}" if signed else f"{mean:.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sigma", type=float, default=0.05, help="LMD's sigma in training")
    args = parser.parse_args()
    from lightning_lowprec.litgpt.checkpoint import make_default

    paths = make_default(RESULTS_DIR / "lowprec-default")
    per_seed = []
    for seed in args.seeds:
        start = time.perf_counter()
        module, optimizer = train(seed, args.steps, args.sigma, paths["checkpoint"],
                                  paths["instructions"])
        per_seed.append(evaluate(module, optimizer, paths["checkpoint"], paths["instructions"]))
        print(f"  seed {seed}: {time.perf_counter() - start:.0f} s, "
              f"point NLL {per_seed[-1]['point estimate']['NLL']:.4f}", flush=True)
    rows = table(per_seed)
    print_table(rows, COLUMNS)
    write_json("bma", rows, seeds=args.seeds, steps=args.steps, sigma=args.sigma,
               samples=list(SAMPLES), tokens=per_seed[0]["point estimate"]["tokens"],
               per_seed=per_seed)


if __name__ == "__main__":
    main()
