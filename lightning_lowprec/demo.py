"""The built-in default job: quantize a LitGPT model's weights to every format and report.

``python -m lightning_lowprec.demo`` builds a LitGPT ``GPT`` (the pythia-14m architecture with a
4096-token vocabulary, random init: no download), fake-quantizes every matrix weight except the
LM head to each format, and prints one row per format: storage bits per element (the MX scale
amortised over its block), the weights' signal-to-quantization-noise ratio, how far the logits
move when the model runs on the quantized weights, and the time to quantize all weights eagerly.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lightning_lowprec.formats import FORMATS, Format
from lightning_lowprec.quantize import quantize


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    noise = (reference - approx).float().pow(2).sum()
    return (10 * torch.log10(reference.float().pow(2).sum() / noise)).item()


def storage_bits(fmt: Format) -> float:
    """Bits per element including the shared 8-bit E8M0 scale spread over its block."""
    return fmt.bits + (8 / fmt.block_size if fmt.block_size else 0.0)


def build_model(name: str, seed: int) -> torch.nn.Module:
    from litgpt import GPT, Config

    torch.manual_seed(seed)
    return GPT(Config.from_name(name, vocab_size=4096, padded_vocab_size=4096)).eval()


def run(model_name: str = "pythia-14m", seed: int = 0) -> list[dict]:
    """One row per format for ``model_name`` (any LitGPT config name, random init)."""
    model = build_model(model_name, seed)
    matrices = {
        n: m for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (4, 128), generator=generator)
    with torch.no_grad():
        logits = model(tokens)
    rows = []
    for fmt in FORMATS.values():
        quantized = copy.deepcopy(model)
        modules = dict(quantized.named_modules())
        start = time.perf_counter()
        with torch.no_grad():
            for name in matrices:
                weight = modules[name].weight
                weight.copy_(quantize(weight, fmt, axis=-1))
        elapsed_ms = (time.perf_counter() - start) * 1e3
        with torch.no_grad():
            q_logits = quantized(tokens)
        weight_sqnr = sqnr_db(
            torch.cat([m.weight.flatten() for m in matrices.values()]),
            torch.cat([modules[n].weight.flatten() for n in matrices]),
        )
        rows.append(
            {
                "format": fmt.name,
                "bits/element": storage_bits(fmt),
                "weight SQNR dB": weight_sqnr,
                "logits SQNR dB": sqnr_db(logits, q_logits),
                "quantize ms": elapsed_ms,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Quantize a LitGPT model to every format.")
    parser.add_argument("--model", default="pythia-14m", help="LitGPT config name (random init)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(args.model, args.seed)
    print(f"LitGPT {args.model} (vocab 4096, random init): matrix weights quantized along "
          "in_features, LM head kept; logits on 4 x 128 random tokens")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(
            f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
