"""Overhead of FabricNormMonitor on a small LitGPT training loop, against no monitor.

The loop is the full low-precision stack, so that every statistic is computed: a litgpt GPT
(pythia-14m's shape with a 4096-token vocabulary, 2.2M parameters) with learnable multipliers
(``"paper"`` placement), trained by LMD under the ``LowPrecision`` plugin (MXFP6 E2M3 forward),
with ``fabric.clip_gradients`` and a TensorBoard logger, as in LitGPT's pretraining loop.

Three configurations run the same ``--steps`` optimizer steps per timed call, interleaved
round by round (the minimum over ``--repeat`` rounds is kept): no monitor; the monitor at the
default interval (``every_n_steps=50``); the monitor logging every step, whose extra time per
step is the cost of one logged step. Issue 7's target: at most 5% at the default interval.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.monitor [--steps 50] [--repeat 6]``.
Prints a table; writes ``benchmarks/results/monitor.json``. Times in ms.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import TensorBoardLogger

from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec import LMD, LowPrecision
from lightning_lowprec.callbacks import FabricNormMonitor
from lightning_lowprec.multipliers import add_multipliers
from lightning_lowprec.optim import param_groups

TARGET = 1.05
"""Most step time with the monitor at the default interval / without, that issue 7 allows."""
DEFAULT_EVERY = 50


def training_loop(
    every_n_steps: int | None, args: argparse.Namespace, log_dir: str
) -> Callable[[], None]:
    """A function that runs ``args.steps`` training steps of a fresh model, monitor or not."""
    from litgpt import GPT, Config

    callbacks = [] if every_n_steps is None else [FabricNormMonitor(every_n_steps=every_n_steps)]
    fabric = L.Fabric(
        accelerator=args.accelerator,
        devices=1,
        plugins=[LowPrecision(args.fmt)],
        loggers=[TensorBoardLogger(log_dir, name=f"every_{every_n_steps}")],
        callbacks=callbacks,
    )
    torch.manual_seed(0)
    config = Config.from_name(
        "pythia-14m", vocab_size=4096, padded_vocab_size=4096, block_size=args.seq_len
    )
    gpt = GPT(config)
    add_multipliers(gpt, "paper")
    optimizer = LMD(param_groups(gpt), lr=1e-2, seed=0)
    model, optimizer = fabric.setup(gpt, optimizer)
    tokens = torch.randint(0, 4096, (args.batch_size, args.seq_len + 1), device=fabric.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def run() -> None:
        for _ in range(args.steps):
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_EVERY, help="steps per timed call")
    parser.add_argument("--repeat", type=int, default=6, help="timed rounds (min is kept)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fmt", default="mxfp6_e2m3")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.steps % DEFAULT_EVERY:
        parser.error(f"--steps must be a multiple of {DEFAULT_EVERY}, so every call logs alike")

    configs = {"no monitor": None, f"every {DEFAULT_EVERY} (default)": DEFAULT_EVERY, "every 1": 1}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        runs = {name: training_loop(every, args, log_dir) for name, every in configs.items()}
        for run in runs.values():
            run()  # warm-up: LMD state, first logs, allocator
        for _ in range(args.repeat):
            for name, run in runs.items():
                ms = best_time(run, repeat=1, warmup=0)
                best[name] = min(best.get(name, ms), ms)

    base = best["no monitor"] / args.steps
    per_log = best["every 1"] / args.steps - base
    rows = []
    for name, every in configs.items():
        step = best[name] / args.steps
        logs = 0 if every is None else args.steps // every
        rows.append({
            "config": name,
            "ms/step": step,
            "ratio": step / base,
            "extra ms per log": None if not logs else (best[name] - best["no monitor"]) / logs,
        })
    estimate = 1 + per_log / (DEFAULT_EVERY * base)
    measured = rows[1]["ratio"]
    print(
        f"\nFabricNormMonitor overhead: {args.steps} steps per call, min of {args.repeat} "
        f"rounds; batch {args.batch_size}x{args.seq_len}, {args.fmt}, LMD, multipliers, "
        f"{args.accelerator}, {torch.get_num_threads()} thread(s)"
    )
    print_table(rows, ["config", "ms/step", "ratio", "extra ms per log"])
    verdict = "met" if max(measured, estimate) <= TARGET else "MISSED"
    print(
        f"default interval: measured {measured:.3f}x, from the cost of a logged step "
        f"{estimate:.4f}x; target <= {TARGET}x: {verdict}"
    )
    path = write_json(
        "monitor",
        rows,
        steps=args.steps,
        repeat=args.repeat,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        fmt=args.fmt,
        accelerator=args.accelerator,
        default_interval={"measured": measured, "from_logged_step_cost": estimate,
                          "target": TARGET},
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
