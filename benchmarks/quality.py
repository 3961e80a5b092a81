"""Quality suite: the seed papers' low-precision claims, tested at CPU scale.

A small LitGPT ``GPT`` (pythia-style blocks, byte-level vocabulary of 256) is trained on
``../shared/data/tinyshakespeare.txt`` (90% train, the last 10% held out for validation; when
the file is absent, on text built from the standard library's docstrings, as the tests do)
for a fixed token budget, through Fabric with this package's ``LowPrecision`` plugin and
optimizers, the way a user would (README). Every run clips gradients at 1.0 with
``fabric.clip_gradients`` (the plugin leaves multipliers out) and follows the same schedule:
linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak lr.

Experiments (cells; every cell runs ``seeds`` seeds, paired: seed ``s`` gives every cell the
same initial weights and the same batch order):

1. {AdamW, Madam, LMD, M+Adam} x {unquantized, MXFP8 E4M3, MXFP6 E2M3, MXFP4 E2M1 forward}:
   final validation loss and the weight-norm curve (claim: AdamW degrades under MXFP6 and LMD
   does not; LMD's weight norm stays bounded where Madam's and AdamW's grow).
2. LMD trained at posterior samples vs at the point estimate (``sample=False``), MXFP6
   (claim: the noise is what keeps it stable).
3. Pure-BF16 AdamW (weights and states rounded to BF16 after every step, no FP32 master) vs
   M+Adam with ``storage="bf16"`` and BF16 states vs FP32 AdamW (claim: M+Adam closes most of
   the gap). BF16 storage is emulated in fp32 tensors that hold BF16 values, and the matmuls
   run in fp32 for every cell: a bf16 matmul is ~35x slower than fp32 on a CPU without
   AVX512-BF16 (measured: 332 vs 9.4 ms for 2048x128 @ 128x512), which would put these cells
   outside the time budget. What is tested is the claim's subject, the storage precision of
   weights and optimizer states; BF16 activations are not.
4. AdamW with learnable multipliers (``add_multipliers(gpt, "paper")``) off / on, and on with
   the multipliers' gradients included in the clipping norm (``clip_grad_norm_`` over every
   parameter) (claim: multipliers help; including them in clipping hurts).

Learning rates: each optimizer's lr is chosen by a small sweep on equal terms (``LR_GRID``,
unquantized, seed 0, lowest final validation loss; a grid whose best lr lies at an end is
extended by a factor of 3 that way, twice at most) and reused by every cell of that optimizer
(the BF16 cells take their FP32 twin's lr, the multiplier and LMD point-estimate cells too).

Runs go to a pool of worker processes with one thread each; every run's result is cached as
JSON under ``<out>/runs/``, so an interrupted suite resumes where it stopped. At the end the
suite prints markdown tables, writes ``<out>/quality.json`` and PNG plots into ``<out>``.

Run: ``python -m benchmarks.quality [--quick] [--workers 2] [--out DIR]``. Losses are in nats
per byte; times in seconds of wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.timing import RESULTS_DIR, cpu_name, print_table
from lightning_lowprec.litgpt.checkpoint import stdlib_docstrings

if TYPE_CHECKING:
    from litgpt import Config

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 256
"""Byte-level tokens: one byte of the UTF-8 text per token (tinyshakespeare is ASCII)."""
VAL_FRACTION = 0.1
CLIP = 1.0
FORMATS = {
    "fp32": None,
    "mxfp8": "mxfp8_e4m3",
    "mxfp6": "mxfp6_e2m3",
    "mxfp4": "mxfp4_e2m1",
}
"""Short cell-name suffix -> forward format of every Linear but the LM head (None: none)."""
LR_GRID = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "madam": (3e-3, 1e-2, 3e-2),
    "lmd": (3e-3, 1e-2, 3e-2),
    "mplus": (1e-3, 3e-3, 1e-2),
}
"""Peak learning rates swept per optimizer (M+Adam: its additive lr; lr_m = 3 lr)."""
MAX_EXTENSIONS = 2
"""How often the sweep may extend a grid whose best lr lies at its end (see ``sweep_lr``)."""


@dataclass(frozen=True)
class Size:
    """Model and budget of one suite. Tokens per run = steps * batch * seq_len."""

    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch: int
    steps: int
    eval_every: int
    eval_windows: int
    final_eval_windows: int
    norm_every: int
    seeds: int


SIZES = {
    "full": Size(n_layer=2, n_embd=128, n_head=4, seq_len=128, batch=16, steps=150,
                 eval_every=25, eval_windows=16, final_eval_windows=128, norm_every=5, seeds=3),
    "quick": Size(n_layer=1, n_embd=64, n_head=2, seq_len=32, batch=8, steps=40,
                  eval_every=20, eval_windows=4, final_eval_windows=8, norm_every=5, seeds=1),
}


@dataclass(frozen=True)
class Cell:
    """One training configuration. ``lr_from`` names the sweep whose best lr it uses."""

    name: str
    optimizer: str  # "adamw", "madam", "lmd", "mplus"
    fmt: str | None = None
    sample: bool = True
    bf16: bool = False  # weights and optimizer states held at BF16 precision, no FP32 master
    multipliers: bool = False
    clip_multipliers: bool = False  # clip over every parameter, multipliers included
    lr_from: str = ""


def cells() -> dict[str, Cell]:
    """Every cell of experiments 1-4, by name."""
    out = {}
    for opt in LR_GRID:
        for short, fmt in FORMATS.items():
            out[f"{opt}/{short}"] = Cell(f"{opt}/{short}", opt, fmt, lr_from=opt)
    extra = [
        Cell("lmd-point/mxfp6", "lmd", FORMATS["mxfp6"], sample=False, lr_from="lmd"),
        Cell("adamw-bf16/fp32", "adamw", bf16=True, lr_from="adamw"),
        Cell("mplus-bf16/fp32", "mplus", bf16=True, lr_from="mplus"),
        Cell("adamw+mult/fp32", "adamw", multipliers=True, lr_from="adamw"),
        Cell("adamw+mult-clipall/fp32", "adamw", multipliers=True, clip_multipliers=True,
             lr_from="adamw"),
    ]
    out.update({cell.name: cell for cell in extra})
    return out


EXPERIMENTS = {
    "1 optimizer x forward format": [f"{o}/{f}" for o in LR_GRID for f in FORMATS],
    "2 LMD sampled vs point estimate (MXFP6)": ["lmd/mxfp6", "lmd-point/mxfp6", "lmd/fp32"],
    "3 pure BF16 vs FP32": ["adamw/fp32", "adamw-bf16/fp32", "mplus-bf16/fp32", "mplus/fp32"],
    "4 multipliers and clipping": ["adamw/fp32", "adamw+mult/fp32", "adamw+mult-clipall/fp32"],
}
QUICK_CELLS = [
    "adamw/fp32", "adamw/mxfp6", "lmd/fp32", "lmd/mxfp6", "lmd-point/mxfp6", "madam/mxfp4",
    "mplus/fp32", "adamw-bf16/fp32", "mplus-bf16/fp32", "adamw+mult/fp32",
    "adamw+mult-clipall/fp32",
]
"""Cells of ``--quick``: every experiment represented, every optimizer and cell kind."""


def load_text(path: Path = SHAKESPEARE) -> tuple[str, str]:
    """The corpus and its name: tinyshakespeare, or the stdlib's docstrings when it is absent."""
    if path.is_file():
        return path.read_text(encoding="utf-8"), path.name
    return "\n\n".join(stdlib_docstrings().values()), "stdlib docstrings"


def split_tokens(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens split into (train, validation): the last ``VAL_FRACTION`` is held out."""
    tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    return tokens[:cut], tokens[cut:]


def gpt_config(size: Size) -> Config:
    """pythia-14m's block design (parallel residual, LayerNorm, GELU MLP, 25% rotary) at
    ``size``'s depth and width, with a 256-byte vocabulary."""
    from litgpt import Config

    return Config.from_name(
        "pythia-14m", n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head,
        intermediate_size=4 * size.n_embd, block_size=size.seq_len, vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
    )


def lr_factor(step: int, steps: int) -> float:
    """Schedule multiplier: linear warm-up over 5% of ``steps``, cosine to 0.1 at the end."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def build_optimizer(cell: Cell, gpt: torch.nn.Module, lr: float, seed: int
                    ) -> torch.optim.Optimizer:
    """The optimizer a user would write for ``cell`` (README): ``param_groups`` for all, so
    matrices decay 0.1 and norms/biases not; LMD/Madam/M+Adam keep embeddings, norms, biases
    and multipliers on their AdamW rule."""
    from lightning_lowprec import LMD, Madam, MPlusAdam
    from lightning_lowprec.optim import param_groups

    groups = param_groups(gpt, lr=lr)
    if cell.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cell.optimizer == "madam":
        return Madam(groups, lr=lr)
    if cell.optimizer == "lmd":
        return LMD(groups, lr=lr, seed=seed)
    if cell.optimizer == "mplus":
        if cell.bf16:
            return MPlusAdam(groups, lr=lr, seed=seed, storage="bf16", state_dtype="bfloat16")
        return MPlusAdam(groups, lr=lr, seed=seed)
    raise ValueError(f"unknown optimizer {cell.optimizer!r}")


@torch.no_grad()
def round_to_bf16(tensors: list[torch.Tensor]) -> None:
    """Round fp32 tensors to the nearest BF16 value in place (ties to even): BF16 storage."""
    for t in tensors:
        t.copy_(t.to(torch.bfloat16))


def adamw_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """AdamW's parameters and its moment states (not the step counts)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    states = [v for p in params for k, v in optimizer.state[p].items() if k != "step"]
    return params + states


def matrix_norm(gpt: torch.nn.Module) -> float:
    """L2 norm over the stored matrices (>= 2 dims; no embeddings, no multipliers): the
    quantity whose growth the LMD paper reports for AdamW/Madam."""
    from lightning_lowprec.optim import param_groups

    groups = {g["name"]: g["params"] for g in param_groups(gpt)}
    return math.sqrt(sum(p.detach().float().square().sum().item()
                         for p in groups.get("matrices", [])))


def run_cell(cell: Cell, lr: float, seed: int, size: Size, data: Path) -> dict[str, Any]:
    """Train one cell at one lr and seed; return losses (nats/byte), curves and wall time."""
    import lightning as L
    import torch.nn.functional as F
    from litgpt import GPT

    from lightning_lowprec import LowPrecision
    from lightning_lowprec.multipliers import add_multipliers

    start = time.perf_counter()
    train, val = split_tokens(load_text(data)[0])
    torch.manual_seed(seed)
    gpt = GPT(gpt_config(size))
    if cell.multipliers:
        add_multipliers(gpt, "paper")
    if cell.bf16:
        round_to_bf16(list(gpt.parameters()))
    optimizer = build_optimizer(cell, gpt, lr, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, size.steps))
    fabric = L.Fabric(accelerator="cpu", devices=1,
                      plugins=[LowPrecision(cell.fmt, sample=cell.sample)])
    model, fabric_opt = fabric.setup(gpt, optimizer)

    batches = torch.Generator().manual_seed(seed)
    stride = (len(val) - size.seq_len - 1) // size.final_eval_windows

    def windows(tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.stack([tokens[s : s + size.seq_len + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())

    def evaluate(n: int) -> float:
        """Mean loss over the first ``n`` of the fixed, evenly spaced validation windows."""
        model.eval()
        with torch.no_grad():
            losses = [
                loss_of(*windows(val, torch.arange(i, min(i + size.batch, n)) * stride)).item()
                for i in range(0, n, size.batch)
            ]
        model.train()
        return statistics.fmean(losses)

    val_curve = [(0, evaluate(size.eval_windows))]
    norm_curve = [(0, matrix_norm(gpt))]
    train_curve = []
    train_start = time.perf_counter()
    for step in range(1, size.steps + 1):
        starts = torch.randint(0, len(train) - size.seq_len - 1, (size.batch,), generator=batches)
        loss = loss_of(*windows(train, starts))
        fabric.backward(loss)
        if cell.clip_multipliers:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        else:
            fabric.clip_gradients(model, fabric_opt, max_norm=CLIP)
        fabric_opt.step()
        fabric_opt.zero_grad()
        if cell.bf16 and cell.optimizer == "adamw":
            round_to_bf16(adamw_tensors(optimizer))  # pure BF16: nothing kept at fp32
        schedule.step()
        train_curve.append(loss.item())
        if step % size.norm_every == 0:
            norm_curve.append((step, matrix_norm(gpt)))
        if step % size.eval_every == 0 and step < size.steps:
            val_curve.append((step, evaluate(size.eval_windows)))
    train_s = time.perf_counter() - train_start
    final = evaluate(size.final_eval_windows)
    val_curve.append((size.steps, final))
    return {
        "cell": cell.name, "lr": lr, "seed": seed, "val_loss": final,
        "init_val_loss": val_curve[0][1], "val_curve": val_curve, "norm_curve": norm_curve,
        "train_loss_first10": statistics.fmean(train_curve[:10]),
        "train_loss_last10": statistics.fmean(train_curve[-10:]),
        "finite": all(map(math.isfinite, train_curve)) and math.isfinite(final),
        "ms_per_step": 1e3 * train_s / size.steps,
        "wall_s": time.perf_counter() - start,
        "skipped_steps": getattr(optimizer, "skipped_steps", 0),
    }


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _run_job(args: tuple[Cell, float, int, Size, Path, Path]) -> dict[str, Any]:
    """Worker entry point: run one (cell, lr, seed) and cache its result as JSON."""
    cell, lr, seed, size, data, path = args
    result = run_cell(cell, lr, seed, size, data)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # atomic: a killed suite never leaves a half-written result
    return result


class Runner:
    """Runs (cell, lr, seed) jobs on a process pool, reusing results cached in ``runs_dir``."""

    def __init__(self, size: Size, data: Path, runs_dir: Path, workers: int) -> None:
        # One folder per size: a cached run is only ever reused by a suite of the same size.
        tag = "-".join(f"{k}{v}" for k, v in asdict(size).items() if k != "seeds")
        self.size, self.data, self.runs_dir, self.workers = size, data, runs_dir / tag, workers
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def path(self, cell: Cell, lr: float, seed: int) -> Path:
        tag = cell.name.replace("/", "_")
        return self.runs_dir / f"{tag}__lr{lr:g}__seed{seed}.json"

    def run(self, jobs: list[tuple[Cell, float, int]]) -> dict[tuple[str, float, int], dict]:
        """Results of every job, running only those without a cached result."""
        results, todo = {}, []
        for cell, lr, seed in jobs:
            path = self.path(cell, lr, seed)
            if path.is_file():
                results[(cell.name, lr, seed)] = json.loads(path.read_text())
            else:
                todo.append((cell, lr, seed, self.size, self.data, path))
        if not todo:
            return results
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before torch loads
        with ProcessPoolExecutor(self.workers, get_context("spawn"), _init_worker) as pool:
            futures = {pool.submit(_run_job, job): job for job in todo}
            for done, future in enumerate(as_completed(futures), 1):
                cell, lr, seed = futures[future][:3]
                r = future.result()
                results[(cell.name, lr, seed)] = r
                print(f"  [{done}/{len(todo)}] {cell.name} lr={lr:g} seed={seed}: "
                      f"val {r['val_loss']:.4f}, {r['wall_s']:.0f} s", flush=True)
        return results


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sweep_lr(runner: Runner, grid: dict[str, list[float]], extensions: int = MAX_EXTENSIONS
             ) -> tuple[dict[str, float], dict[tuple[str, float, int], dict]]:
    """Each optimizer's best lr (lowest final validation loss; unquantized, seed 0) and the
    sweep's results. A best lr at an end of its grid extends the grid by a factor of 3 in that
    direction (at most ``extensions`` times), so that the optimum is bracketed; ``grid`` is
    extended in place."""
    cells_ = cells()
    for extension in range(extensions + 1):
        jobs = [(cells_[f"{opt}/fp32"], lr, 0) for opt, lrs in grid.items() for lr in lrs]
        print(f"lr sweep: {len(jobs)} runs", flush=True)
        sweep = runner.run(jobs)
        best = {opt: min(lrs, key=lambda lr, o=opt: _loss(sweep[(f"{o}/fp32", lr, 0)]))
                for opt, lrs in grid.items()}
        if extension == extensions:
            break
        edges = 0
        for opt, lrs in grid.items():
            if best[opt] == max(lrs):
                lrs.append(float(f"{max(lrs) * 3:.3g}"))
                edges += 1
            elif best[opt] == min(lrs):
                lrs.insert(0, float(f"{min(lrs) / 3:.3g}"))
                edges += 1
        if not edges:
            break
    return best, sweep


def run_suite(size: Size, names: list[str], grid: dict[str, tuple[float, ...]], data: Path,
              out: Path, workers: int, extensions: int = MAX_EXTENSIONS) -> dict[str, Any]:
    """Sweep, then every cell in ``names`` at ``size.seeds`` seeds; return the summary."""
    all_cells = cells()
    chosen = [all_cells[n] for n in names]
    runner = Runner(size, data, out / "runs", workers)
    suite_start = time.perf_counter()
    grid = {opt: list(lrs) for opt, lrs in grid.items() if opt in {c.lr_from for c in chosen}}
    best_lr, sweep = sweep_lr(runner, grid, extensions)
    print("best lr:", best_lr, flush=True)
    jobs = [(c, best_lr[c.lr_from], s) for c in chosen for s in range(size.seeds)]
    print(f"cells: {len(jobs)} runs", flush=True)
    results = runner.run(jobs)

    summary_cells = {}
    for cell in chosen:
        runs = [results[(cell.name, best_lr[cell.lr_from], s)] for s in range(size.seeds)]
        mean, std = summarize([r["val_loss"] for r in runs])
        summary_cells[cell.name] = {
            "config": asdict(cell), "lr": best_lr[cell.lr_from],
            "val_loss_mean": mean, "val_loss_std": std,
            "val_losses": [r["val_loss"] for r in runs],
            "init_val_loss": statistics.fmean(r["init_val_loss"] for r in runs),
            "final_norm_mean": statistics.fmean(r["norm_curve"][-1][1] for r in runs),
            "finite": all(r["finite"] for r in runs),
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            "ms_per_step_mean": statistics.fmean(r["ms_per_step"] for r in runs),
            "val_curve": _mean_curve([r["val_curve"] for r in runs]),
            "norm_curve": _mean_curve([r["norm_curve"] for r in runs]),
            "runs": runs,
        }
    text, corpus = load_text(data)
    return {
        "size": asdict(size), "corpus": corpus, "corpus_bytes": len(text.encode("utf-8")),
        "tokens_per_run": size.steps * size.batch * size.seq_len,
        "parameters": _parameter_count(size), "workers": workers,
        "lr_grid": grid, "best_lr": best_lr,
        "sweep": [{"optimizer": opt, "lr": lr, "val_loss": sweep[(f"{opt}/fp32", lr, 0)][
            "val_loss"]} for opt, lrs in grid.items() for lr in lrs],
        "cells": summary_cells,
        "experiments": {k: [n for n in v if n in summary_cells] for k, v in EXPERIMENTS.items()},
        "paired_deltas": _paired_deltas(summary_cells),
        "suite_wall_s": time.perf_counter() - suite_start,
        "run_wall_s_total": sum(r["wall_s"] for r in {**sweep, **results}.values()),
        "torch": torch.__version__, "cpu": cpu_name(), "cpus": os.cpu_count(),
    }


def _loss(result: dict) -> float:
    """A run's final validation loss; a diverged run (NaN) ranks last."""
    return result["val_loss"] if math.isfinite(result["val_loss"]) else math.inf


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    return [[pts[0][0], statistics.fmean(p[1] for p in pts)] for pts in zip(*curves, strict=True)]


def _parameter_count(size: Size) -> int:
    from litgpt import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(gpt_config(size)).parameters())


PAIRS = {
    **{f"{opt}: {fmt} - fp32": (f"{opt}/{fmt}", f"{opt}/fp32")
       for opt in LR_GRID for fmt in FORMATS if fmt != "fp32"},
    "LMD MXFP6: point estimate - sampled": ("lmd-point/mxfp6", "lmd/mxfp6"),
    "AdamW: pure BF16 - FP32": ("adamw-bf16/fp32", "adamw/fp32"),
    "M+Adam BF16 - FP32 AdamW": ("mplus-bf16/fp32", "adamw/fp32"),
    "AdamW: multipliers - none": ("adamw+mult/fp32", "adamw/fp32"),
    "multipliers: clip all - clip without": ("adamw+mult-clipall/fp32", "adamw+mult/fp32"),
}
"""Paired differences of final validation loss (same seed = same init and batches)."""


def _paired_deltas(summary: dict[str, dict]) -> dict[str, dict[str, float]]:
    out = {}
    for label, (a, b) in PAIRS.items():
        if a in summary and b in summary:
            diffs = [x - y for x, y in zip(summary[a]["val_losses"], summary[b]["val_losses"],
                                           strict=True)]
            mean, std = summarize(diffs)
            out[label] = {"mean": mean, "std": std, "n": len(diffs)}
    return out


def print_report(summary: dict[str, Any]) -> None:
    """Markdown tables: the sweep, each experiment's cells, the paired differences."""
    print(f"\n{summary['parameters'] / 1e6:.2f}M-parameter GPT, {summary['corpus']}, "
          f"{summary['tokens_per_run']} tokens per run, {summary['size']['seeds']} seed(s); "
          f"wall time of this invocation {summary['suite_wall_s'] / 60:.1f} min (all runs: "
          f"{summary['run_wall_s_total'] / 60:.1f} worker-min)\n")
    print_table(summary["sweep"], ["optimizer", "lr", "val_loss"])
    for title, names in summary["experiments"].items():
        print(f"\n### {title}\n")
        rows = [{"cell": n, "lr": summary["cells"][n]["lr"],
                 "val loss": _pm(summary["cells"][n]),
                 "final weight norm": summary["cells"][n]["final_norm_mean"],
                 "ms/step": summary["cells"][n]["ms_per_step_mean"],
                 "wall s": summary["cells"][n]["wall_s_mean"]} for n in names]
        print_table(rows, ["cell", "lr", "val loss", "final weight norm", "ms/step", "wall s"])
    print("\n### paired differences (val loss, mean ± std over seeds)\n")
    print_table([{"difference": k, "mean ± std": f"{v['mean']:+.4f} ± {v['std']:.4f}"}
                 for k, v in summary["paired_deltas"].items()], ["difference", "mean ± std"])


def _pm(cell: dict) -> str:
    return f"{cell['val_loss_mean']:.4f} ± {cell['val_loss_std']:.4f}"


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots: final validation loss per cell (mean ± std, one panel per experiment),
    validation-loss curves and weight-norm curves of experiment 1 (one panel per format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = summary["cells"]
    paths = []
    experiments = {k: v for k, v in summary["experiments"].items() if v}
    fig, axes = plt.subplots(1, len(experiments), figsize=(4.5 * len(experiments), 4.2),
                             squeeze=False)
    for ax, (title, names) in zip(axes[0], experiments.items(), strict=True):
        means = [cells_[n]["val_loss_mean"] for n in names]
        kinds = list(dict.fromkeys(n.split("/")[0] for n in names))
        colors = [f"C{kinds.index(n.split('/')[0])}" for n in names]
        ax.bar(range(len(names)), means, yerr=[cells_[n]["val_loss_std"] for n in names],
               capsize=3, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
        low = [m - cells_[n]["val_loss_std"] for m, n in zip(means, names, strict=True)]
        high = [m + cells_[n]["val_loss_std"] for m, n in zip(means, names, strict=True)]
        low, high = [x for x in low if math.isfinite(x)], [x for x in high if math.isfinite(x)]
        if low and high:  # zoom on the bars' tops: the differences are 1% of the loss
            pad = 0.1 * (max(high) - min(low)) + 0.005
            ax.set_ylim(min(low) - pad, max(high) + pad)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("final validation loss (nats/byte)")
    fig.tight_layout()
    paths.append(_save(fig, out / "quality_val_loss.png"))

    for key, ylabel, name in (("val_curve", "validation loss (nats/byte)", "val_curves"),
                              ("norm_curve", "matrix weight norm (L2)", "weight_norm")):
        formats = [f for f in FORMATS if any(n.endswith(f"/{f}") for n in cells_)]
        fig, axes = plt.subplots(1, len(formats), figsize=(4 * len(formats), 3.6), squeeze=False,
                                 sharey=True)
        for ax, fmt in zip(axes[0], formats, strict=True):
            for n in cells_:
                if n.endswith(f"/{fmt}") and "+" not in n and "-bf16" not in n:
                    # Validation: from the first evaluation after step 0, where they differ.
                    points = cells_[n][key][1:] if key == "val_curve" else cells_[n][key]
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, label=n.split("/")[0])
            ax.set_title(f"forward: {fmt}")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        paths.append(_save(fig, out / f"quality_{name}.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 1 seed, a subset of cells (CI; under a minute)")
    parser.add_argument("--workers", type=int, default=2, help="parallel one-thread processes")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default benchmarks/results/quality[-quick])")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="training text")
    parser.add_argument("--cells", nargs="*", choices=list(cells()), help="only these cells")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    names = args.cells or (QUICK_CELLS if args.quick else list(cells()))
    grid: dict[str, tuple[float, ...]] = (
        {o: lrs[:2] for o, lrs in LR_GRID.items()} if args.quick else LR_GRID
    )
    out = args.out or RESULTS_DIR / ("quality-quick" if args.quick else "quality")
    out.mkdir(parents=True, exist_ok=True)
    summary = run_suite(size, names, grid, args.data, out, args.workers,
                        extensions=0 if args.quick else MAX_EXTENSIONS)
    summary["plots"] = [p.name for p in plot(summary, out)]
    print_report(summary)
    path = out / "quality.json"
    path.write_text(json.dumps(summary, indent=1))
    print("wrote", path, "and", ", ".join(summary["plots"]))


if __name__ == "__main__":
    main()
