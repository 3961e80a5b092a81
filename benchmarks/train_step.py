"""End-to-end LitGPT train step: this package's configurations against bf16-mixed + AdamW.

One training step (forward, cross-entropy, ``fabric.backward``, ``optimizer.step()``,
``zero_grad``) of a litgpt ``GPT`` with pythia-14m's shape and a 4096-token vocabulary (2.2M
parameters, random init, random tokens) under Fabric on CPU, for each configuration in
``CONFIGS``. The peer is what a LitGPT user runs by default: ``precision="bf16-mixed"`` with
``torch.optim.AdamW``; fp32 AdamW is reported too, because on a CPU without AVX512-BF16 a bf16
matmul is emulated and far slower than fp32, which flatters every fp32 configuration against
the bf16 peer.

Each configuration runs in its own subprocess, so that its peak resident memory (see
``peak_rss_bytes``) is its own: allocator caches and compiled kernels of one configuration
never count against another. Reported per configuration: ms per
step (the minimum over ``--repeat`` steps after ``--warmup`` steps, which build optimizer
state and compile), tokens/s, the ratio to the peer's and to fp32 AdamW's step time,
optimizer-state bytes (all tensors in ``optimizer.state``, per parameter), peak RSS (MB,
also minus the RSS after imports: what the model, optimizer and steps added) and the bytes
one forward saves for its backward beyond the parameters (``saved_bytes``: exact, where the
RSS of so small a model is noisy).

Where the time goes (``phase_times``, each the minimum over ``--repeat`` further steps, summed
over the micro-batches of one optimizer step): the forwards with the loss (for sampled LMD
they include drawing the sample, which the plugin does before each forward), the backwards
(with restoring the point estimate after each), the optimizer step with ``zero_grad``, and,
inside those, the time spent in the MX quantizer (every call of ``lightning_lowprec.nn``'s
``quantize``), in LMD's ``sample_()`` and in its ``restore_()`` (each timed around the call,
as the plugin makes it); for LMD, ``sample+restore`` times the pair on its own, repeated
within one step (so, from the second pair on, the spare buffers' swaps).

``--micro-batches N`` accumulates gradients over ``N`` micro-batches per optimizer step
(``fabric.no_backward_sync``, the loss divided by ``N``), each of ``--batch-size`` sequences;
``--old-schedule`` makes LMD recompute the sample and the point estimate at every
micro-batch, as before its spare buffers (to compare the two in one run).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.train_step [--batch-size 4] [--seq-len 128]
[--micro-batches 1]``.
Prints a table; writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import best_time, print_table, write_json

PEER = "bf16-mixed + AdamW"
FP32_PEER = "fp32 + AdamW"


@dataclass(frozen=True)
class TrainConfig:
    """One row: Fabric's precision string or our plugin, and the optimizer."""

    precision: str | None  # Fabric's precision; None: our LowPrecision plugin
    plugin: dict[str, Any] | None  # LowPrecision(**plugin)
    optimizer: str  # "adamw", "lmd", "lmd-compiled", "mplus-bf16"


CONFIGS = {
    PEER: TrainConfig("bf16-mixed", None, "adamw"),
    FP32_PEER: TrainConfig("32-true", None, "adamw"),
    "MXFP8 + AdamW": TrainConfig(None, {"fmt": "mxfp8_e4m3"}, "adamw"),
    "MXFP6 + AdamW": TrainConfig(None, {"fmt": "mxfp6_e2m3"}, "adamw"),
    "MXFP6 + LMD sampled": TrainConfig(None, {"fmt": "mxfp6_e2m3"}, "lmd"),
    "MXFP6 + LMD point estimate": TrainConfig(None, {"fmt": "mxfp6_e2m3", "sample": False}, "lmd"),
    "MXFP6 + LMD sampled, compiled step": TrainConfig(None, {"fmt": "mxfp6_e2m3"}, "lmd-compiled"),
    "no quantization + LMD sampled": TrainConfig(None, {"fmt": None}, "lmd"),
    "MXFP6 bf16-autocast + LMD sampled": TrainConfig(
        None, {"fmt": "mxfp6_e2m3", "autocast": "bf16"}, "lmd"),
    "M+Adam bf16 storage": TrainConfig("32-true", None, "mplus-bf16"),
}
QUICK_CONFIGS = [PEER, FP32_PEER, "MXFP6 + LMD sampled"]


def build_optimizer(kind: str, gpt: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer as the README writes it (defaults; LMD on ``param_groups``)."""
    from lightning_lowprec import LMD, MPlusAdam
    from lightning_lowprec.optim import param_groups

    builders: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adamw": lambda: torch.optim.AdamW(gpt.parameters(), lr=3e-3),
        "lmd": lambda: LMD(param_groups(gpt), seed=0),
        "lmd-compiled": lambda: LMD(param_groups(gpt), seed=0, compiled=True),
        "mplus-bf16": lambda: MPlusAdam(gpt.parameters(), storage="bf16", seed=0),
    }
    return builders[kind]()


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process's own
    memory map. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux carries
    it across ``fork`` + ``exec``: a child started by a parent holding 1.2 GB reports at least
    1.2 GB (measured). Elsewhere ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def saved_bytes(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward in the forward run inside the block.

    Yields a one-element list that holds the total when the block ends: each distinct storage
    saved counts once, the model's parameters not at all (they exist anyway). It is the part of
    a step's peak memory that the layers' backward choices decide, exact where RSS is noisy.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


def _timing(spent: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding the seconds each call takes to ``spent[key]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    return timed


def phase_times(
    forward: Callable[[int], torch.Tensor], backward: Callable[[int, torch.Tensor], None],
    step: Callable[[], None], repeat: int, micro_batches: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Milliseconds of each phase of a train step (minimum over ``repeat`` steps each), the
    forwards and backwards summed over ``micro_batches`` (``forward(i)``, ``backward(i, loss)``).

    The quantizer's share is timed by wrapping the ``quantize`` that ``lightning_lowprec.nn``
    calls (eager layers; a compiled module would not call it), so it counts every operand the
    forward and a quantized backward quantize, and nothing else; ``sample_`` and ``restore_``
    of a posterior ``optimizer`` are timed likewise (an instance attribute over the method,
    which the plugin calls through the instance).
    """
    from lightning_lowprec import nn as lowprec_nn

    original = lowprec_nn.quantize
    spent = {"quantize ms": 0.0, "sample ms": 0.0, "restore ms": 0.0}
    posterior = optimizer is not None and hasattr(optimizer, "sample_")
    phases: dict[str, list[float]] = {"fwd ms": [], "bwd ms": [], "step ms": [],
                                      **{key: [] for key in spent}}
    lowprec_nn.quantize = _timing(spent, "quantize ms", original)
    if posterior:
        optimizer.sample_ = _timing(spent, "sample ms", optimizer.sample_)
        optimizer.restore_ = _timing(spent, "restore ms", optimizer.restore_)
    try:
        for _ in range(repeat):
            spent.update(dict.fromkeys(spent, 0.0))
            fwd = bwd = 0.0
            for i in range(micro_batches):
                t0 = time.perf_counter()
                loss = forward(i)
                t1 = time.perf_counter()
                backward(i, loss)
                fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
            t2 = time.perf_counter()
            step()
            for key, seconds in (("fwd ms", fwd), ("bwd ms", bwd),
                                 ("step ms", time.perf_counter() - t2), *spent.items()):
                phases[key].append(seconds)
    finally:
        lowprec_nn.quantize = original
        if posterior:
            del optimizer.sample_, optimizer.restore_
    times = {key: min(values) * 1e3 for key, values in phases.items()}
    if not posterior:
        del times["sample ms"], times["restore ms"]
    return times


def measure(
    name: str, batch_size: int, seq_len: int, warmup: int, repeat: int, micro_batches: int = 1,
    old_schedule: bool = False,
) -> dict:
    """Time one configuration in this process; return its row (no ratios yet)."""
    import lightning as L
    import torch.nn.functional as F
    from litgpt import GPT, Config

    from benchmarks.optim import state_bytes
    from lightning_lowprec import LowPrecision

    rss_after_imports = peak_rss_bytes()
    if old_schedule:
        from lightning_lowprec.optim.lmd import LMD

        LMD._sample_from_spare = lambda self, p, shard: False  # this process only
    config = CONFIGS[name]
    if config.plugin is None:
        fabric = L.Fabric(accelerator="cpu", devices=1, precision=config.precision)
    else:
        fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision(**config.plugin)])
    torch.manual_seed(0)
    gpt = GPT(Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096,
                               block_size=seq_len))
    parameters = sum(p.numel() for p in gpt.parameters())
    optimizer = build_optimizer(config.optimizer, gpt)
    model, optimizer = fabric.setup(gpt, optimizer)
    tokens = torch.randint(0, 4096, (micro_batches, batch_size, seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[0, :, :-1], tokens[0, :, 1:]  # saved_bytes' one micro-batch

    def forward(i: int) -> torch.Tensor:
        x, y = tokens[i, :, :-1], tokens[i, :, 1:]
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()) / micro_batches

    def backward(i: int, loss: torch.Tensor) -> None:
        with fabric.no_backward_sync(model, enabled=i < micro_batches - 1):
            fabric.backward(loss)

    def step() -> None:
        for i in range(micro_batches):
            backward(i, forward(i))
        optimizer.step()
        optimizer.zero_grad()

    ms = best_time(step, repeat=repeat, warmup=warmup)
    inner = optimizer.optimizer
    phases = phase_times(forward, backward, lambda: (optimizer.step(), optimizer.zero_grad()),
                         repeat, micro_batches, inner)
    if hasattr(inner, "sample_"):
        phases["sample+restore ms"] = best_time(lambda: (inner.sample_(), inner.restore_()),
                                                repeat=repeat, warmup=1)
    state = state_bytes(optimizer.optimizer)
    peak = peak_rss_bytes()
    with saved_bytes(gpt) as saved:
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
    fabric.backward(loss)
    optimizer.zero_grad()
    return {
        "config": name + (" (old schedule)" if old_schedule else ""),
        "ms/step": ms,
        **phases,
        "tokens/s": batch_size * seq_len / (ms / 1e3),
        "state B/param": state / parameters,
        "state MB": state / 2**20,
        "peak RSS MB": peak / 2**20,
        "RSS over imports MB": (peak - rss_after_imports) / 2**20,
        "saved for backward MB": saved[0] / 2**20,
        "parameters": parameters,
    }


def run(
    names: list[str], batch_size: int, seq_len: int, warmup: int, repeat: int,
    micro_batches: int = 1, old_schedule: bool = False,
) -> list[dict]:
    """Measure each configuration in a fresh subprocess; add the ratios to the peers.
    ``old_schedule``: each LMD configuration also as before the spare buffers, right after
    the new one (the pair alternates on a loaded machine)."""
    rows = []
    runs = [(name, False) for name in names]
    if old_schedule:
        runs = [r for name in names for r in ((name, False), (name, True))
                if not r[1] or CONFIGS[name].optimizer.startswith("lmd")]
    for name, old in runs:
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--child", name,
               "--batch-size", str(batch_size), "--seq-len", str(seq_len),
               "--warmup", str(warmup), "--repeat", str(repeat),
               "--micro-batches", str(micro_batches), *(["--old-schedule"] if old else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
               "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  measured {rows[-1]['config']}: {rows[-1]['ms/step']:.1f} ms/step", flush=True)
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        for peer, key in ((PEER, "x peer"), (FP32_PEER, "x fp32 AdamW")):
            row[key] = row["ms/step"] / by_name[peer]["ms/step"] if peer in by_name else None
    return rows


COLUMNS = ["config", "ms/step", "tokens/s", "x peer", "x fp32 AdamW", "state B/param",
           "peak RSS MB", "RSS over imports MB", "saved for backward MB"]
PHASE_COLUMNS = ["config", "ms/step", "fwd ms", "bwd ms", "step ms", "quantize ms",
                 "sample ms", "restore ms", "sample+restore ms"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (state, compile)")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps (min is kept)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="gradient-accumulation micro-batches per optimizer step")
    parser.add_argument("--old-schedule", action="store_true",
                        help="also run LMD rows with the sample recomputed per micro-batch")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batches < 1:
        parser.error(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if args.child:  # one configuration, measured in this process: print its row as JSON
        row = measure(args.child, args.batch_size, args.seq_len, args.warmup, args.repeat,
                      args.micro_batches, args.old_schedule)
        print(json.dumps(row))
        return
    rows = run(args.configs, args.batch_size, args.seq_len, args.warmup, args.repeat,
               args.micro_batches, args.old_schedule)
    print(f"\nLitGPT train step (pythia-14m shape, vocab 4096, {rows[0]['parameters'] / 1e6:.1f}M "
          f"parameters), {args.micro_batches} micro-batch(es) of "
          f"{args.batch_size}x{args.seq_len}, cpu, "
          f"{torch.get_num_threads()} thread(s), min of {args.repeat} steps; peer: {PEER}")
    print_table(rows, COLUMNS)
    print("\nWhere the time goes (ms, minimum per phase; quantize is inside fwd and bwd):")
    print_table([{c: r.get(c) for c in PHASE_COLUMNS} for r in rows], PHASE_COLUMNS)
    path = write_json("train_step", rows, batch_size=args.batch_size, seq_len=args.seq_len,
                      micro_batches=args.micro_batches,
                      warmup=args.warmup, repeat=args.repeat, peer=PEER)
    print("wrote", path)


if __name__ == "__main__":
    main()
