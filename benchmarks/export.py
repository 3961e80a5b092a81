"""Packed MX checkpoints: file size per format against fp32, export/load time, exact logits.

Two models: the built-in default (``lowprec-litgpt make_default``'s pythia-14m-shaped GPT with
a 4096-token vocabulary, random init) and a pythia-160m-shaped GPT (random init, litgpt's
config: 162M parameters). Each is exported with :func:`lightning_lowprec.export.export_mx` in
MXFP4 / MXFP6 / MXFP8 (every Linear but the LM head, as the plugin quantizes by default).

Columns: the file's bytes; the target, ``(bits + 8/32) / 8`` bytes per quantized weight
(4.25 / 6.25 / 8.25 bits: the codes and one E8M0 byte per 32) plus the unquantized rest in fp32;
``vs target %``, the file's excess over it (the issue asks for within 1%); ``bits/q-weight``,
the file minus the unquantized rest per quantized weight (header included); ``x fp32``, the size
against the peer a user would otherwise keep: litgpt's fp32 ``lit_model.pth``
(``torch.save``); export and load times
(``load_mx`` to a dequantized state dict; min over ``--repeat``); and whether the logits of the
model loaded from the file equal those of the fake-quantized model (``quantize_linears``) bit
for bit, both for dequantized weights and for packed layers (:class:`PackedLinear`).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.export [--repeat 2] [--quick]``
(``--quick``: the default model only). Prints a table; writes
``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import print_table, write_json
from lightning_lowprec import FORMATS, quantize_linears
from lightning_lowprec.export import export_mx, load_mx

FORMATS_MEASURED = ("mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3")
COLUMNS = ["model", "format", "params M", "quantized M", "MB", "target MB", "vs target %",
           "bits/q-weight",
           "x fp32", "export s", "load s", "logits exact", "packed logits exact"]


def models() -> dict[str, object]:
    """Builders of the measured models (called one at a time, so only one is in memory)."""
    from litgpt import GPT, Config

    def built_in_default():
        from lightning_lowprec.litgpt.checkpoint import make_default

        directory = Path(tempfile.mkdtemp(prefix="lowprec-default-"))
        checkpoint = make_default(directory)["checkpoint"]
        model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
        model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True))
        return model

    def pythia_160m():
        torch.manual_seed(0)
        model = GPT(Config.from_name("pythia-160m"))
        model.apply(model._init_weights)
        return model

    return {"built-in default (pythia-14m shape)": built_in_default,
            "pythia-160m shape": pythia_160m}


def measure(name: str, model: torch.nn.Module, fmt: str, repeat: int, tmp: Path) -> dict:
    model.eval()
    path = tmp / f"{fmt}.safetensors"
    export_s = []
    for _ in range(repeat):
        start = time.perf_counter()
        formats = export_mx(model, fmt, path)
        export_s.append(time.perf_counter() - start)
    load_s = []
    for _ in range(repeat):
        start = time.perf_counter()
        state = load_mx(path)
        load_s.append(time.perf_counter() - start)
    reference = model.state_dict()
    quantized = sum(reference[k].numel() for k in formats)
    rest = sum(v.numel() * v.element_size() for k, v in reference.items() if k not in formats)
    target = quantized * (FORMATS[fmt].bits + 8 / 32) / 8 + rest
    fp32_path = tmp / "lit_model.pth"
    torch.save(reference, fp32_path)

    tokens = torch.randint(0, model.config.padded_vocab_size, (1, 64),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = quantize_linears_copy(model, fmt)(tokens)
        loaded = copy.deepcopy(model)
        loaded.load_state_dict(state)
        del state
        exact = torch.equal(quantize_linears_copy(loaded, fmt, inplace=True)(tokens), expected)
        del loaded
        packed = load_mx(path, copy.deepcopy(model), dequantize=False)
        packed_exact = torch.equal(packed(tokens), expected)
        del packed
    size = path.stat().st_size
    return {
        "model": name, "format": fmt,
        "params M": sum(v.numel() for v in reference.values()) / 1e6,
        "quantized M": quantized / 1e6,
        "MB": size / 1e6, "target MB": target / 1e6, "vs target %": 100 * (size / target - 1),
        "bits/q-weight": (size - rest) * 8 / quantized,
        "x fp32": size / fp32_path.stat().st_size,
        "export s": min(export_s), "load s": min(load_s),
        "logits exact": exact, "packed logits exact": packed_exact,
    }


def quantize_linears_copy(
    model: torch.nn.Module, fmt: str, inplace: bool = False
) -> torch.nn.Module:
    """``model`` (or a copy of it) with its Linear layers fake-quantized as the plugin does."""
    model = model if inplace else copy.deepcopy(model)
    quantize_linears(model, fmt)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="timed export/load calls")
    parser.add_argument("--quick", action="store_true", help="the built-in default only")
    args = parser.parse_args()
    rows = []
    builders = models()
    if args.quick:
        builders = dict(list(builders.items())[:1])
    for name, build in builders.items():
        model = build()
        with tempfile.TemporaryDirectory(prefix="lowprec-export-") as tmp:
            for fmt in FORMATS_MEASURED:
                rows.append(measure(name, model, fmt, args.repeat, Path(tmp)))
                print(f"  {name} {fmt}: {rows[-1]['MB']:.2f} MB", flush=True)
        del model
    print_table(rows, COLUMNS)
    write_json("export", rows, repeat=args.repeat)


if __name__ == "__main__":
    main()
