"""The GPU check: the CUDA tests, then a pythia-410m-shaped LitGPT train step, one table.

For a session that is lent a GPU (H100/H200/B200), in well under 10 minutes:

1. ``pytest -m cuda tests``: the quantizer on CUDA bit for bit against the CPU quantizer, the
   optimizers' compiled (Triton) kernels against their eager steps, the ``scaled_mm`` backend
   against the emulation, the plugin training a GPT.
2. One training step (forward, cross-entropy, ``fabric.backward``, ``optimizer.step()``,
   ``zero_grad``) of a litgpt ``GPT`` shaped like pythia-410m (random init and tokens) under
   Fabric on one GPU, each configuration in its own subprocess (its own peak memory):
   ``bf16-mixed`` + fused AdamW (the peer: what a LitGPT user runs), ``fp8_e4m3`` on
   ``torch._scaled_mm`` + fused AdamW, torchao's float8 training
   (``convert_to_float8_training``, the peer a user would pick for FP8) + fused AdamW, and
   MXFP6 emulated + LMD (the method, with its quantization emulated). Reported: ms per step
   (minimum over ``--repeat`` steps after ``--warmup``), tokens/s, ratio to the peer, peak
   CUDA memory.
3. The optimizer step alone on the 410m parameters with random gradients: LMD's compiled step
   (sample + step) against ``torch.optim.AdamW(fused=True)``.

All layers but the LM head are quantized (the plugin's and torchao's default filter here).
Eager mode (no ``torch.compile`` of the model): torchao's float8 is built to be compiled, so
eager understates it; ``--compile`` compiles the model in every configuration.

Without CUDA the script still runs: the tests and every GPU row are reported as skipped
("no CUDA device") and the JSON says so. ``--device cpu`` runs the rows on CPU instead (a check
of the code paths; the times mean nothing) and ``--quick`` shrinks everything to pythia-14m.

Run: ``python -m benchmarks.gpu [--quick] [--out DIR] [--device cpu] [--compile]``.
Prints one table; writes ``gpu.json`` to ``benchmarks/results/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import print_table

ROOT = Path(__file__).resolve().parents[1]
PEER = "bf16-mixed + fused AdamW"
OPT_PEER = "AdamW fused step"
NO_CUDA = "skipped: no CUDA device"


@dataclass(frozen=True)
class GPUConfig:
    """One train-step row: our plugin's settings (``None``: Fabric's ``bf16-mixed``), the
    optimizer, and whether torchao converts the Linear layers to float8 training."""

    plugin: dict[str, Any] | None
    optimizer: str  # "adamw" (fused on CUDA) or "lmd"
    torchao: bool = False


CONFIGS = {
    PEER: GPUConfig(None, "adamw"),
    "fp8_e4m3 scaled_mm + fused AdamW": GPUConfig(
        {"fmt": "fp8_e4m3", "backend": "scaled_mm", "autocast": "bf16"}, "adamw"),
    "torchao float8 + fused AdamW": GPUConfig(None, "adamw", torchao=True),
    "MXFP6 emulated + LMD": GPUConfig(
        {"fmt": "mxfp6_e2m3", "backend": "emulated", "autocast": "bf16"}, "lmd"),
}
OPTIMIZERS = (OPT_PEER, "LMD compiled step (sample + step)")
SIZES = {
    "full": {"model": "pythia-410m", "vocab": None, "batch_size": 8, "seq_len": 1024,
             "warmup": 3, "repeat": 10},
    "quick": {"model": "pythia-14m", "vocab": 4096, "batch_size": 2, "seq_len": 64,
              "warmup": 1, "repeat": 2},
}
COLUMNS = ["section", "case", "status", "ms", "tokens/s", "x peer", "peak memory MB"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Minimum wall time of ``fn()`` in ms, the device synchronised around each call."""
    import time

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_gpt(size: dict, device: torch.device) -> torch.nn.Module:
    from litgpt import GPT, Config

    overrides = {"block_size": size["seq_len"]}
    if size["vocab"]:
        overrides |= {"vocab_size": size["vocab"], "padded_vocab_size": size["vocab"]}
    torch.manual_seed(0)
    with device:
        return GPT(Config.from_name(size["model"], **overrides))


def build_optimizer(kind: str, gpt: torch.nn.Module, device: torch.device, compiled: bool):
    from lightning_lowprec import LMD
    from lightning_lowprec.optim import param_groups

    if kind == "adamw":
        return torch.optim.AdamW(gpt.parameters(), lr=3e-4, fused=device.type == "cuda")
    return LMD(param_groups(gpt), seed=0, compiled=compiled)


def measure_train_step(name: str, size: dict, device: torch.device, compile_model: bool) -> dict:
    """One train-step row, measured in this process."""
    import lightning as L
    import torch.nn.functional as F

    from lightning_lowprec import LowPrecision

    config = CONFIGS[name]
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    if config.plugin is None:
        fabric = L.Fabric(accelerator=accelerator, devices=1, precision="bf16-mixed")
    else:
        plugin = LowPrecision(**config.plugin, device=device.type)
        fabric = L.Fabric(accelerator=accelerator, devices=1, plugins=[plugin])
    gpt = make_gpt(size, device)
    if config.torchao:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(gpt, module_filter_fn=lambda _, fqn: "lm_head" not in fqn)
    optimizer = build_optimizer(config.optimizer, gpt, device, compiled=True)
    model, optimizer = fabric.setup(gpt, optimizer)
    if compile_model:
        model = torch.compile(model)
    vocab = gpt.config.padded_vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (size["batch_size"], size["seq_len"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> None:
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    ms = best_ms(step, device, size["warmup"], size["repeat"])
    return {"section": "train step", "case": name, "status": "measured", "ms": ms,
            "tokens/s": size["batch_size"] * size["seq_len"] / (ms / 1e3),
            "peak memory MB": peak_memory_mb(device),
            "parameters": sum(p.numel() for p in gpt.parameters())}


def measure_optimizers(size: dict, device: torch.device) -> list[dict]:
    """LMD's compiled sample + step against fused AdamW on the model's parameters."""
    gpt = make_gpt(size, device)
    for p in gpt.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for name in OPTIMIZERS:
        optimizer = build_optimizer("adamw" if name == OPT_PEER else "lmd", gpt, device, True)

        def step(optimizer=optimizer) -> None:
            if hasattr(optimizer, "sample_"):
                optimizer.sample_()
                optimizer.restore_()
            optimizer.step()

        rows.append({"section": "optimizer step", "case": name, "status": "measured",
                     "ms": best_ms(step, device, size["warmup"] + 2, size["repeat"])})
        del optimizer
    return rows


def run_child(args: list[str]) -> list[dict]:
    """``python -m benchmarks.gpu --child ...`` in a fresh process; its rows (or a failure)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [{"status": f"failed: {tail[0][:160]}", "stderr": done.stderr[-3000:]}]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cuda_tests(timeout_s: int) -> dict:
    """``pytest -m cuda tests``: its summary line and the pass/fail/skip counts."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    if done.returncode:
        status = "failed"
    else:
        status = "passed" if counts.get("passed") else "skipped: no CUDA device"
    return {"status": status, "summary": summary, **counts,
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pythia-14m, 2 timed steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: run the rows on CPU (a code-path check; times mean nothing)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    parser.add_argument("--test-timeout", type=int, default=300, help="seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    device = torch.device(args.device)

    if args.child:  # one measurement in this process: print its rows as JSON
        if args.child == "optimizers":
            rows = measure_optimizers(size, device)
        else:
            rows = [measure_train_step(args.child, size, device, args.compile)]
        print(json.dumps(rows))
        return

    available = device.type == "cpu" or torch.cuda.is_available()
    facts: dict[str, Any] = {"torch": torch.__version__, "device": "cpu" if available else NO_CUDA,
                             "size": size, "compile": args.compile}
    if device.type == "cuda" and available:
        facts |= {"device": torch.cuda.get_device_name(),
                  "capability": list(torch.cuda.get_device_capability())}
    if args.no_tests:
        tests = {"status": "not run (--no-tests)"}
    elif device.type == "cuda" and not available:
        tests = {"status": NO_CUDA}
    else:
        tests = run_cuda_tests(args.test_timeout)
        print("pytest -m cuda:", tests.get("summary", tests["status"]), flush=True)

    child = ["--device", args.device] + ["--quick"] * args.quick + ["--compile"] * args.compile
    rows: list[dict] = []
    for name in args.configs:
        row = {"section": "train step", "case": name}
        row |= run_child(["--child", name, *child])[0] if available else {"status": NO_CUDA}
        rows.append(row)
        print(f"  {name}: {row['status']}", flush=True)
    if available:
        measured = run_child(["--child", "optimizers", *child])
        rows += measured if "case" in measured[0] else [
            {"section": "optimizer step", "case": name, **measured[0]} for name in OPTIMIZERS]
    else:
        rows += [{"section": "optimizer step", "case": name, "status": NO_CUDA}
                 for name in OPTIMIZERS]
    for peer in (PEER, OPT_PEER):
        base = next((r for r in rows if r["case"] == peer and r.get("ms")), None)
        for row in rows:
            if row.get("section") == (base or {}).get("section") and row.get("ms"):
                row["x peer"] = row["ms"] / base["ms"]

    print(f"\nGPU check on {facts['device']} ({size['model']}, batch {size['batch_size']}x"
          f"{size['seq_len']}, {'compiled' if args.compile else 'eager'}); "
          f"peers: {PEER}, {OPT_PEER}")
    print(f"CUDA tests: {tests.get('summary', tests['status'])}")
    print_table(rows, COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    path.write_text(json.dumps({"benchmark": "gpu", **facts, "tests": tests, "peer": PEER,
                                "rows": rows}, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
