"""Speed and memory in one table: quantizer, QuantizedLinear, optimizer step, LitGPT train step.

Runs the four benchmarks in one process tree and lists every measurement as a ratio to its
peer from the same run: the quantizer against torchao's MX emulation (``MXTensor``; a scaled
``.to(float8)`` round trip for per-tensor FP8), ``QuantizedLinear`` (and torchao's
``MXFakeQuantizedLinear``) against a plain ``nn.Linear`` in the same mode, each optimizer step
against ``torch.optim.AdamW(fused=True)``, and each end-to-end LitGPT train step against
``bf16-mixed`` + ``torch.optim.AdamW`` (and fp32 AdamW, see ``benchmarks/train_step.py``), with
optimizer-state bytes per parameter and the peak RSS of each train-step configuration. Times
are ms (minimum over repeats); "x peer" is our time / the peer's time (below 1: faster).

The optimizer benchmark runs as a subprocess (``python -m benchmarks.optim``; its JSON is read
back), each train-step configuration too (for its own peak RSS). CPU only: no GPU row.

As ``python -m benchmarks.quantize`` does, the process asks glibc to keep freed memory for
reuse (``benchmarks.quantize.keep_freed_memory``), so that the in-process sections (quantizer,
``QuantizedLinear``) time kernels, not the page faults of every fresh 32 MiB+ buffer;
``--return-freed-memory`` keeps glibc's default. The JSON records ``reuse_freed_memory``. The
optimizer and train-step subprocesses start with glibc's default either way.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks [--quick] [--out DIR] [--sections ...]
[--return-freed-memory]``.
Prints the table; writes ``benchmarks.json`` (and each section's own JSON) to
``benchmarks/results/`` or ``--out``. ``--quick`` (small shapes, no compilation, a subset of
formats and configurations) takes about a minute. ``--sections train_step`` (say) re-runs some
sections and keeps the other sections' rows from the last run in the same directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import linear, quantize, timing, train_step
from benchmarks.timing import cpu_name, print_table, write_json
from lightning_lowprec import FORMATS

SECTIONS = ("quantize", "linear", "optim", "train_step")
SETTINGS = {
    "full": {
        "quantize": {"size": 4096, "repeat": 5, "formats": None, "use_compile": True},
        "linear": {"tokens": 512, "d_in": 512, "d_out": 1024, "repeat": 10,
                   "formats": list(FORMATS), "modes": ("eager", "compiled")},
        "optim": ["--model", "pythia-70m", "--warmup", "2", "--repeats", "3"],
        "train_step": {"names": list(train_step.CONFIGS), "batch_size": 4, "seq_len": 128,
                       "warmup": 2, "repeat": 5},
    },
    "quick": {
        "quantize": {"size": 512, "repeat": 2,
                     "formats": ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"], "use_compile": False},
        "linear": {"tokens": 128, "d_in": 256, "d_out": 256, "repeat": 3,
                   "formats": ["mxfp6_e2m3"], "modes": ("eager",)},
        "optim": ["--model", "pythia-14m", "--warmup", "1", "--repeats", "2", "--only",
                  "AdamW foreach", "AdamW fused", "LMD foreach", "M+Adam foreach",
                  "Madam foreach"],
        "train_step": {"names": train_step.QUICK_CONFIGS, "batch_size": 2, "seq_len": 64,
                       "warmup": 1, "repeat": 2},
    },
}
PEERS = {
    "quantize": "torchao MXTensor (torch cast for per-tensor FP8), eager",
    "linear": "nn.Linear in the same mode",
    "optim": "torch.optim.AdamW(fused=True) step",
    "train_step": train_step.PEER,
}
COLUMNS = ["benchmark", "case", "ms", "peer", "peer ms", "x peer", "x copy_", "x fp32 AdamW",
           "state B/param", "tokens/s", "peak RSS MB"]


def row(benchmark: str, case: str, ms: float | None, peer: str | None,
        peer_ms: float | None, ratio: float | None = None, **extra: float | None) -> dict:
    """One line of the combined table; ``x peer`` = ``ratio`` if given (a benchmark that
    times its peer in its own window says so), else ``ms / peer_ms`` where both exist."""
    if ratio is None and ms is not None and peer_ms:
        ratio = ms / peer_ms
    return {"benchmark": benchmark, "case": case, "ms": ms, "peer": peer, "peer ms": peer_ms,
            "x peer": ratio, **extra}


def quantize_rows(settings: dict, reuse_freed_memory: bool) -> list[dict]:
    """``benchmarks.quantize.run``: one row per format and mode against torchao (eager)."""
    rows = quantize.run(**settings)
    write_json("quantize", rows, **{k: v for k, v in settings.items() if k != "formats"},
               reuse_freed_memory=reuse_freed_memory)
    out = []
    for r in rows:
        for mode in ("eager", "compiled"):
            if r[f"ours {mode} ms"] is not None:
                peer = f"{r['peer']} eager" if r["peer"] else None
                case = f"{r['format']} {r['shape']} {r['dtype']} {mode}"
                out.append(row("quantize", case, r[f"ours {mode} ms"], peer, r["peer ms"],
                               **{"x copy_": r[f"{mode} / copy_"]}))
    return out


def linear_rows(settings: dict) -> list[dict]:
    """``benchmarks.linear.run``: ours and torchao's layers against nn.Linear, per mode."""
    rows, errors = linear.run(**settings)
    write_json("linear", rows, **settings, errors=sorted(errors))
    plain = rows[0]
    out = []
    for r in rows[1:]:
        for mode in ("eager", "compiled"):
            if r[f"{mode} ms"] is not None:
                out.append(row("linear", f"{r['layer']} {mode}", r[f"{mode} ms"],
                               f"nn.Linear {mode}", plain[f"{mode} ms"]))
            if r.get(f"torchao {mode} ms") is not None:
                out.append(row("linear", f"torchao {r['layer']} {mode}", r[f"torchao {mode} ms"],
                               f"nn.Linear {mode}", plain[f"{mode} ms"]))
    for error in sorted(errors):
        print(f"  linear n/a: {error}")
    return out


def optim_rows(args: list[str], threads: int) -> list[dict]:
    """Run ``python -m benchmarks.optim`` (it has no callable API) and read its JSON."""
    env = {**os.environ, "LOWPREC_BENCHMARK_RESULTS": str(timing.RESULTS_DIR)}
    cmd = [sys.executable, "-m", "benchmarks.optim", "--threads", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"benchmarks.optim failed:\n{done.stderr[-3000:]}")
    payload = json.loads((timing.RESULTS_DIR / "optim.json").read_text())
    base = next(r for r in payload["rows"] if r["optimizer"] == "AdamW fused")
    peer = "AdamW fused step"
    out = []
    for r in payload["rows"]:
        # Each row carries its own fused-AdamW time and ratio, timed in alternation with it.
        peer_ms = r.get("fused_ms", base["step_ms"])
        state = {"state B/param": r["state_bytes_per_param"]}
        out.append(row("optim", f"{r['optimizer']} step", r["step_ms"], peer, peer_ms,
                       r.get("step_x_fused"), **state))
        if "sample_step_ms" in r:
            out.append(row("optim", f"{r['optimizer']} sample+step", r["sample_step_ms"], peer,
                           peer_ms, r.get("sample_step_x_fused"), **state))
    return out


def train_step_rows(settings: dict) -> list[dict]:
    """``benchmarks.train_step.run``: each configuration against bf16-mixed + AdamW."""
    rows = train_step.run(**settings)
    write_json("train_step", rows, **{k: v for k, v in settings.items() if k != "names"},
               peer=train_step.PEER)
    peer = next((r for r in rows if r["config"] == train_step.PEER), None)
    return [
        row("train_step", r["config"], r["ms/step"], train_step.PEER,
            peer["ms/step"] if peer else None,
            **{key: r[key] for key in ("x fp32 AdamW", "state B/param", "tokens/s",
                                       "peak RSS MB")})
        for r in rows
    ]


def plot_ratios(rows: list[dict], path: Path) -> Path:
    """A PNG with one horizontal bar per row: ``x peer`` on a log axis, one panel per
    benchmark (1 = the peer's time; left of the line is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {b: [r for r in rows if r["benchmark"] == b and r["x peer"]] for b in SECTIONS}
    groups = {b: rs for b, rs in groups.items() if rs}
    heights = [max(2.0, 0.22 * len(rs) + 0.8) for rs in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (benchmark, rs) in zip(axes[:, 0], groups.items(), strict=True):
        ratios = [r["x peer"] for r in rs]
        fp32 = [r.get("x fp32 AdamW") for r in rs]
        height = 0.4 if any(fp32) else 0.8
        ax.barh(range(len(rs)), ratios, height=height, label=f"x {PEERS[benchmark]}",
                color=["tab:green" if x <= 1 else "tab:red" for x in ratios])
        if any(fp32):  # the train step's second peer: on a CPU, bf16 is the slow one
            ax.barh([i + height for i in range(len(rs))], [x or 0 for x in fp32],
                    height=height, color="tab:gray", label="x fp32 + AdamW")
            ax.legend(fontsize=7)
        ax.set_yticks([i + (height / 2 if any(fp32) else 0) for i in range(len(rs))],
                      [r["case"] for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{benchmark}: time / peer time, peer = {PEERS[benchmark]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every benchmark (1: ratios are fair on a shared "
                             "machine)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="keep glibc's default of unmapping freed large buffers (every "
                        "fresh output then page-faults)")
    args = parser.parse_args(argv)
    reuse = not args.return_freed_memory and quantize.keep_freed_memory()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        timing.RESULTS_DIR = args.out.resolve()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the subprocesses
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    # Inductor logs a page of source at CRITICAL when torchao's graph fails; the error suffices.
    logging.getLogger("torch._inductor").setLevel(logging.CRITICAL + 1)
    settings = SETTINGS["quick" if args.quick else "full"]
    collect = {
        "quantize": lambda: quantize_rows(settings["quantize"], reuse),
        "linear": lambda: linear_rows(settings["linear"]),
        "optim": lambda: optim_rows(settings["optim"], args.threads),
        "train_step": lambda: train_step_rows(settings["train_step"]),
    }
    rows: list[dict] = []
    for section in args.sections:
        print(f"{section} ...", flush=True)
        rows += collect[section]()
    previous = timing.RESULTS_DIR / "benchmarks.json"
    if set(args.sections) != set(SECTIONS) and previous.is_file():
        # A re-run of some sections keeps the other sections' rows from the last run.
        kept = json.loads(previous.read_text())
        if kept.get("quick") == args.quick:
            rows = [r for r in kept["rows"] if r["benchmark"] not in args.sections] + rows
            rows.sort(key=lambda r: SECTIONS.index(r["benchmark"]))
            settings = {**kept["settings"], **{s: settings[s] for s in args.sections}}
    memory = "freed memory reused" if reuse else "freed memory unmapped (page faults)"
    print(f"\nspeed and memory, {cpu_name()}, {os.cpu_count()} CPU(s), {args.threads} thread(s); "
          f"ms = minimum over repeats; x peer = ms / peer ms; {memory}\n")
    print_table(rows, COLUMNS)
    sections = sorted({r["benchmark"] for r in rows}, key=SECTIONS.index)
    path = write_json("benchmarks", rows, quick=args.quick, cpu=cpu_name(),
                      cpus=os.cpu_count(), settings={s: settings[s] for s in sections},
                      reuse_freed_memory=reuse)
    print("wrote", path, "and", plot_ratios(rows, timing.RESULTS_DIR / "speed_ratios.png"))


if __name__ == "__main__":
    main()
