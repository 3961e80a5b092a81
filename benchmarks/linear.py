"""Forward+backward time of QuantizedLinear against nn.Linear and torchao's emulated MX linear.

For every format and both backward modes, one layer (``tokens x in -> out``, fp32) runs
forward and backward, eagerly and under ``torch.compile``. The peers: a plain ``nn.Linear``
(every ratio's denominator, in the same mode) and torchao's ``MXFakeQuantizedLinear``
(emulated kernel, the spec's FLOOR scale), which also quantizes the forward only and so is the
peer of ``quantize_backward=False``. torchao has no MXINT8 and no per-tensor FP8 linear, and its
compiled version fails on CPU: "n/a" then, with the reason printed below the table.

Targets (issue 3), forward-only mode: at most 1.5x plain Linear compiled, 3x eager.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.linear [--tokens 512] [--repeat 10]``.
Prints a table; writes ``benchmarks/results/linear.json``. Times: min of N, in ms.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.quantize import torchao_mx_dtype
from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec import FORMATS, QuantizedLinear

TARGETS = {"eager": 3.0, "compiled": 1.5}
"""Most forward-only QuantizedLinear time / nn.Linear time that issue 3 asks for."""


def torchao_linear(base: nn.Linear, fmt: str) -> nn.Module | None:
    """torchao's MXFakeQuantizedLinear sharing ``base``'s parameters, or None without a peer."""
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.qat.mx import MXFakeQuantizeConfig, MXFakeQuantizedLinear
    except ImportError:
        return None
    elem = torchao_mx_dtype(fmt)
    if elem is None:
        return None
    config = MXFakeQuantizeConfig(dtype=elem, scaling_mode=ScaleCalculationMode.FLOOR)
    return MXFakeQuantizedLinear.from_linear(base, activation_config=config, weight_config=config)


def fwd_bwd_ms(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeat: int, errors: set):
    """Min fwd+bwd time in ms (the warm-up call compiles); None, noting why, if it fails."""

    def step() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    torch._dynamo.reset()  # every layer compiles afresh instead of hitting the recompile limit
    try:
        return best_time(step, repeat, warmup=2)
    except Exception as error:  # torchao does not compile on CPU: report it and go on
        errors.add(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}")
        return None


def run(
    tokens: int, d_in: int, d_out: int, repeat: int, formats: list[str],
    modes: tuple[str, ...] = ("eager", "compiled"),
) -> tuple[list[dict], set[str]]:
    """Rows of fwd+bwd times (ms) and ratios to nn.Linear, and the peers' errors; a mode left
    out of ``modes`` is reported as None (``("eager",)`` skips every compilation)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in, requires_grad=True)
    grad = torch.randn(tokens, d_out)
    errors: set[str] = set()

    def both_modes(make: Callable[[], nn.Module | None]) -> dict[str, float | None]:
        times = {}
        for mode in ("eager", "compiled"):
            layer = make() if mode in modes else None
            if layer is None:
                times[mode] = None
                continue
            times[mode] = fwd_bwd_ms(
                torch.compile(layer) if mode == "compiled" else layer, x, grad, repeat, errors
            )
        return times

    plain = both_modes(lambda: base)
    rows = [
        {
            "layer": "nn.Linear",
            "eager ms": plain["eager"],
            "eager / Linear": 1.0,
            "compiled ms": plain["compiled"],
            "compiled / Linear": 1.0,
        }
    ]
    for fmt in formats:
        for quantize_backward in (False, True):

            def make(fmt=fmt, quantize_backward=quantize_backward) -> QuantizedLinear:
                layer = QuantizedLinear(d_in, d_out, fmt=fmt, quantize_backward=quantize_backward)
                layer.load_state_dict(base.state_dict())
                return layer

            ours = both_modes(make)
            peer = (
                both_modes(lambda f=fmt: torchao_linear(base, f)) if not quantize_backward else {}
            )
            row = {"layer": f"{fmt} {'quantized bwd' if quantize_backward else 'fwd-only'}"}
            for mode in ("eager", "compiled"):
                row[f"{mode} ms"] = ours[mode]
                row[f"{mode} / Linear"] = ratio(ours[mode], plain[mode])
            for mode in ("eager", "compiled"):
                row[f"torchao {mode} ms"] = peer.get(mode)
                row[f"torchao {mode} / Linear"] = ratio(peer.get(mode), plain[mode])
            rows.append(row)
            print(f"  measured {row['layer']}", flush=True)
    return rows, errors


def ratio(ms: float | None, baseline: float | None) -> float | None:
    return None if ms is None or baseline is None else ms / baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="rows of the input")
    parser.add_argument("--d-in", type=int, default=512, help="in_features")
    parser.add_argument("--d-out", type=int, default=1024, help="out_features")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per entry (min)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()

    # Inductor logs a page of source at CRITICAL when torchao's graph fails; the error suffices.
    logging.getLogger("torch._inductor").setLevel(logging.CRITICAL + 1)
    rows, errors = run(args.tokens, args.d_in, args.d_out, args.repeat, args.formats)
    print(
        f"\nfwd+bwd of one linear layer: {args.tokens} tokens, {args.d_in} -> {args.d_out}, "
        f"fp32, {torch.get_num_threads()} thread(s), min of {args.repeat}; ratios to nn.Linear "
        "in the same mode"
    )
    print_table(
        rows, [column for column in rows[-1] if not column.startswith("torchao ") or "/" in column]
    )
    verdicts = {}
    for mode, target in TARGETS.items():
        worst = max(
            (row[f"{mode} / Linear"] for row in rows[1:] if row["layer"].endswith("fwd-only")),
            default=None,
        )
        if worst is not None:
            verdicts[mode] = {"worst": worst, "target": target, "met": worst <= target}
            print(
                f"forward-only {mode}: worst {worst:.2f}x nn.Linear, target <= {target}x: "
                f"{'met' if worst <= target else 'MISSED'}"
            )
    for error in sorted(errors):
        print(f"n/a: {error}")
    path = write_json(
        "linear",
        rows,
        shape={"tokens": args.tokens, "in": args.d_in, "out": args.d_out},
        repeat=args.repeat,
        targets_forward_only=verdicts,
        errors=sorted(errors),
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
