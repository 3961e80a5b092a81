"""Optimizer step time and state memory on the parameter shapes of a ~70M LitGPT model.

Compares LMD, M+Adam and Madam (at their defaults, and on the explicit eager ``foreach`` and
``compiled`` paths) against
``torch.optim.AdamW`` with ``foreach=True`` and ``fused=True``, in one process, as ratios to
fused AdamW. The shapes come from ``litgpt.Config.from_name(model)`` built on the meta device
(no download); weights are initialised like LitGPT does (normal 0.02, norm weights 1, biases
0), gradients are fixed random tensors. Each time is the minimum over ``--repeats`` steps
after ``--warmup`` steps (which include compilation). On a shared machine the cost of a
memory-bound step drifts by 2x within minutes, so every candidate is timed in ``--rounds``
rounds that alternate with a fused AdamW step on its own copy of the parameters, and its
``step_x_fused`` divides the two minima of that same window (``fused_ms``); ``step_x_foreach``
is against the ``AdamW foreach`` row. For LMD, "step" is ``optimizer.step()``
and "sample+step" is what training with noise pays per step (without accumulation): the
``sample_()`` before the forward, the ``restore_()`` after the backward and ``step()``.
``peak_step_bytes_per_param`` is the most temporary memory one step holds at once
(:func:`benchmarks.memory.peak_extra_bytes`, after the timed steps, so no state is created in
it), per parameter.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.optim [--threads 1] [--device cuda]``.
Prints a table and writes ``benchmarks/results/optim.json``.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch

from benchmarks.memory import peak_extra_bytes
from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec import LMD, Madam, MPlusAdam


def model_shapes(name: str) -> list[tuple[str, torch.Size]]:
    from litgpt.model import GPT, Config

    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    return [(n, p.shape) for n, p in model.named_parameters()]


def make_params(shapes, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for name, shape in shapes:
        if len(shape) >= 2:
            w = torch.randn(shape, generator=g) * 0.02
        elif name.endswith("bias"):
            w = torch.zeros(shape)
        else:
            w = torch.ones(shape)
        p = torch.nn.Parameter(w.to(device))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        params.append(p)
    return params


def candidates() -> dict[str, Callable]:
    """Every optimizer at its defaults ("default": ``compiled="auto"``, which compiles where
    ``torch.compile`` works) beside the explicit eager ``foreach`` and ``compiled`` paths."""
    return {
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "LMD default": lambda ps: LMD(ps, seed=0),
        "LMD foreach": lambda ps: LMD(ps, seed=0, compiled=False, foreach=True),
        "LMD eager": lambda ps: LMD(ps, seed=0, compiled=False),
        "LMD compiled": lambda ps: LMD(ps, seed=0, compiled=True),
        "M+Adam default": lambda ps: MPlusAdam(ps, seed=0),
        "M+Adam foreach": lambda ps: MPlusAdam(ps, seed=0, compiled=False, foreach=True),
        "M+Adam compiled": lambda ps: MPlusAdam(ps, seed=0, compiled=True),
        "M+Adam bf16-SR compiled": lambda ps: MPlusAdam(
            ps, seed=0, storage="bf16", rounding="stochastic", compiled=True),
        **{f"M+Adam {st} compiled": (lambda ps, st=st: MPlusAdam(ps, seed=0, storage=st,
                                                                 compiled=True))
           for st in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1")},
        "Madam default": lambda ps: Madam(ps),
        "Madam eager": lambda ps: Madam(ps, compiled=False),
        "Madam foreach": lambda ps: Madam(ps, compiled=False, foreach=True),
        "Madam compiled": lambda ps: Madam(ps, compiled=True),
    }


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Minimum wall time of ``fn`` in ms, waiting for the device at the end of each call."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return best_time(call, repeat=repeats, warmup=warmup)


def alternating(fn: Callable[[], None], peer: Callable[[], None], device: torch.device,
                warmup: int, repeats: int, rounds: int) -> tuple[float, float]:
    """Minimum times in ms of ``fn`` and ``peer``, timed in alternating rounds (same window)."""
    times = [(timed(fn, device, warmup if r == 0 else 0, repeats), timed(peer, device, 0, repeats))
             for r in range(rounds)]
    return min(t for t, _ in times), min(t for _, t in times)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


STORED_BYTES = {"bf16": 2.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "fp4_e2m1": 0.5 + 1 / 32}
"""Bytes per weight a real low-precision store would take (FP4: the E8M0 scale per 32)."""


def weight_bytes(opt: torch.optim.Optimizer, real: bool) -> float:
    """The weights' bytes: as held (M+Adam emulates its ``storage`` in the parameter's dtype),
    or with ``real`` as a store in the storage format would hold them."""
    total = 0.0
    for g in opt.param_groups:
        per = STORED_BYTES.get(g.get("storage")) if real else None
        total += sum(p.numel() * (per or p.element_size()) for p in g["params"])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pythia-70m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="subset of optimizer names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = model_shapes(args.model)
    numel = sum(s.numel() for _, s in shapes)
    peer = candidates()["AdamW fused"](make_params(shapes, device))
    peer.step()
    rows = []
    for name, build in candidates().items():
        if args.only and name not in args.only:
            continue
        params = make_params(shapes, device)
        opt = build(params)
        step_ms, fused_ms = alternating(opt.step, peer.step, device, args.warmup, args.repeats,
                                        args.rounds)
        row = {"optimizer": name, "step_ms": step_ms, "fused_ms": fused_ms,
               "step_x_fused": step_ms / fused_ms, "state_bytes": state_bytes(opt),
               "peak_step_bytes_per_param": peak_extra_bytes(opt.step, device) / numel,
               "weight_bytes": weight_bytes(opt, False),
               "real_weight_bytes": weight_bytes(opt, True)}
        if isinstance(opt, LMD):
            def sample_and_step(opt=opt):
                opt.sample_()
                opt.restore_()  # the plugin restores after each backward
                opt.step()
            sample_ms, fused_ms = alternating(sample_and_step, peer.step, device, args.warmup,
                                              args.repeats, args.rounds)
            row["sample_step_ms"] = sample_ms
            row["sample_step_x_fused"] = sample_ms / fused_ms
        rows.append(row)
        print(f"  {name}: {step_ms:.1f} ms ({row['step_x_fused']:.2f}x fused)", flush=True)
        del opt, params
        gc.collect()
    foreach = next((r for r in rows if r["optimizer"] == "AdamW foreach"), None)
    for r in rows:
        if foreach is not None:
            r["step_x_foreach"] = r["step_ms"] / foreach["step_ms"]
        r["state_bytes_per_param"] = r["state_bytes"] / numel
        r["weights_state_bytes_per_param"] = r.pop("weight_bytes") / numel + r[
            "state_bytes_per_param"]
        r["if_stored_low_bytes_per_param"] = r.pop("real_weight_bytes") / numel + r[
            "state_bytes_per_param"]
    print(f"\n{args.model}: {numel / 1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
          f"{torch.get_num_threads()} threads, min of {args.rounds} x {args.repeats} steps\n")
    print_table(rows, ["optimizer", "step_ms", "fused_ms", "step_x_fused", "step_x_foreach",
                       "sample_step_ms", "sample_step_x_fused", "state_bytes_per_param",
                       "weights_state_bytes_per_param", "if_stored_low_bytes_per_param",
                       "peak_step_bytes_per_param"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = write_json("optim", rows, model=args.model, parameters=numel, tensors=len(shapes),
                      device=device_name, repeats=args.repeats, rounds=args.rounds,
                      baseline="AdamW fused", baseline_timing="alternating rounds, per row")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
