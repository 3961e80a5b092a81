"""Shared benchmark plumbing: a min-of-N wall-clock timer, a table printer and a JSON writer.

Every benchmark prints one table and writes the same rows as JSON under ``benchmarks/results``
so that runs can be compared and collected.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(
    os.environ.get("LOWPREC_BENCHMARK_RESULTS", Path(__file__).resolve().parent / "results")
)
"""Where ``write_json`` writes; the environment variable ``LOWPREC_BENCHMARK_RESULTS`` moves
it (``python -m benchmarks --out DIR`` sets it, so its subprocesses write there too)."""


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeat`` calls, in milliseconds.

    The minimum, not the mean: on a shared machine the noise is one-sided (other work only
    ever slows a run down), so the minimum is the best estimate of the cost itself.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as a GitHub-markdown table (floats to 3 significant digits)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "n/a" if value is None else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")


def write_json(name: str, rows: list[dict], **meta: object) -> Path:
    """Write ``rows`` plus machine facts to ``benchmarks/results/<name>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        **meta,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
