"""A measured per-layer format policy vs uniform formats: mean bits/weight at equal worst SQNR.

On the built-in default (``make_default``'s pythia-14m-shaped GPT, 4096-token BPE, random
init) with ``--batches`` batches of 8 x 128 tokens of its instruction set,
:func:`~lightning_lowprec.policy.layer_sqnr` measures every quantized Linear layer's weight
and input SQNR in MXFP4 / MXFP6 / MXFP8 (the 24 layers the plugin quantizes: all but the LM
head). A layer's SQNR in a format is the lower of its weight and input SQNR.

Rows: each uniform format (every layer in it): mean bits per weight (4.25 / 6.25 / 8.25,
scales included) and its worst-layer SQNR; then
:func:`~lightning_lowprec.policy.recommend_formats` with ``min_sqnr_db`` set to that uniform
format's worst-layer SQNR — the same guarantee — and what it costs: mean bits per weight
(weighted by each layer's weight count), its own worst-layer SQNR and how many layers got each
format; then the policy over a sweep of bounds (:data:`QUANTILES` of the layers' MXFP4 SQNR, and
a few round numbers). "bits saved" is against the cheapest uniform format whose worst-layer SQNR
meets the same bound.

``--checkpoint DIR`` measures a trained checkpoint of the same shape instead (e.g. the demo's
LMD + MXFP6 fine-tune, ``out/demo/finetune_full-lmd-mxfp6/final``).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.policy [--batches 4] [--checkpoint DIR]``.
Prints a table; writes ``benchmarks/results/policy.json`` (``--name``; with every layer's SQNR
per format).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

from benchmarks.timing import RESULTS_DIR, print_table, write_json
from lightning_lowprec.policy import (
    DEFAULT_CANDIDATES,
    bits_per_weight,
    layer_sqnr,
    recommend_formats,
)

QUANTILES = (0.0, 0.04, 0.125, 0.25, 0.5, 0.75, 1.0)
"""The swept bounds: these quantiles of the layers' SQNR in the cheapest candidate (a bound
between two uniform formats' worst-layer SQNR is where a per-layer choice can save bits)."""
COLUMNS = ["formats", "min_sqnr_db", "mean bits/weight", "bits saved", "worst-layer SQNR dB",
           "layers fp4/fp6/fp8"]


def model_and_batches(count: int, checkpoint: Path | None):
    from litgpt import GPT, Config, Tokenizer
    from litgpt.data import JSON

    from lightning_lowprec.litgpt.checkpoint import make_default

    paths = make_default(RESULTS_DIR / "lowprec-default")
    checkpoint = checkpoint or paths["checkpoint"]
    gpt = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    state = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    gpt.load_state_dict(state.get("model", state))
    data = JSON(json_path=paths["instructions"], num_workers=0)
    data.connect(tokenizer=Tokenizer(checkpoint), batch_size=8, max_seq_length=128)
    data.setup()
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch["input_ids"])
        if len(batches) == count:
            break
    return gpt, batches


def summary(policy: dict[str, str], measured, sizes: dict[str, int]) -> dict:
    total = sum(sizes.values())
    bits = sum(sizes[name] * bits_per_weight(fmt) for name, fmt in policy.items()) / total
    worst = min(measured[name][fmt].worst_db for name, fmt in policy.items())
    counts = "/".join(str(sum(f == c for f in policy.values())) for c in DEFAULT_CANDIDATES)
    return {"mean bits/weight": bits, "worst-layer SQNR dB": worst, "layers fp4/fp6/fp8": counts,
            "policy": policy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a LitGPT checkpoint of the built-in default's shape, e.g. a "
                        "fine-tune's final/ (default: the built-in default itself)")
    parser.add_argument("--name", default="policy", help="the JSON's name")
    args = parser.parse_args()
    gpt, batches = model_and_batches(args.batches, args.checkpoint)
    measured = layer_sqnr(gpt, batches)
    modules = dict(gpt.named_modules())
    sizes = {name: modules[name].weight.numel() for name in measured}
    rows = []
    for fmt in DEFAULT_CANDIDATES:
        uniform = summary(dict.fromkeys(measured, fmt), measured, sizes)
        rows.append({"formats": f"uniform {fmt}", "min_sqnr_db": None, **uniform})
        bound = uniform["worst-layer SQNR dB"]
        policy = summary(recommend_formats(gpt, batches, min_sqnr_db=bound), measured, sizes)
        saved = uniform["mean bits/weight"] - policy["mean bits/weight"]
        rows.append({"formats": f"policy, bound = uniform {fmt}'s worst",
                     "min_sqnr_db": f"{bound:.2f}", **policy, "bits saved": saved})
    cheapest = sorted(measured[n][DEFAULT_CANDIDATES[0]].worst_db for n in measured)
    # Rounded down to 0.01 dB, so the table shows the bound each row was run with.
    quantiles = [math.floor(100 * cheapest[round(q * (len(cheapest) - 1))]) / 100
                 for q in QUANTILES]
    for bound in sorted({*quantiles, 15.0, 20.0, 25.0, 30.0}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = recommend_formats(gpt, batches, min_sqnr_db=bound)
        met = not caught
        cheapest_uniform = next(
            (bits_per_weight(f) for f in DEFAULT_CANDIDATES
             if all(measured[n][f].worst_db >= bound for n in measured)), None)
        row = summary(policy, measured, sizes)
        rows.append({
            "formats": "policy" + ("" if met else " (bound not met everywhere)"),
            "min_sqnr_db": f"{bound:.2f}", **row,
            "bits saved": None if cheapest_uniform is None
            else cheapest_uniform - row["mean bits/weight"],
        })
    print_table(rows, COLUMNS)
    write_json(
        args.name, rows, batches=args.batches, checkpoint=str(args.checkpoint or "built-in"),
        tokens=sum(b.numel() for b in batches),
        layers={name: {f: s._asdict() for f, s in per.items()} for name, per in measured.items()},
    )


if __name__ == "__main__":
    main()
