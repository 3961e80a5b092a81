"""Speed of the fake quantizer against torchao's MX emulation and the memory-bound limit.

For one fp32 tensor (default 4096 x 4096) and every format, times ``quantize`` eager and under
``torch.compile``, torchao's ``MXTensor.to_mx(x, dtype, 32).dequantize()`` where torchao has
the format (the peer a user would pick; MXINT8 and per-tensor FP8 have none there, so the
per-tensor formats are compared with a plain scaled ``.to(torch.float8_*)`` round trip), and
``x.clone()``, which reads and writes the same bytes and so bounds any element-wise kernel.
Also reports the fraction of elements on which ours and the peer disagree (both round to
nearest-even, so this should be 0).

Run: ``python -m benchmarks.quantize [--size 4096] [--repeat 5]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec.formats import FORMATS, Format
from lightning_lowprec.quantize import quantize


def torchao_mx_dtype(name: str) -> torch.dtype | str | None:
    """torchao's element dtype for one of our MX format names, or None where it has none."""
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    except ImportError:
        return None
    return {
        "mxfp8_e4m3": torch.float8_e4m3fn,
        "mxfp8_e5m2": torch.float8_e5m2,
        "mxfp6_e3m2": DTYPE_FP6_E3M2,
        "mxfp6_e2m3": DTYPE_FP6_E2M3,
        "mxfp4_e2m1": torch.float4_e2m1fn_x2,
    }.get(name)


def torchao_peer(fmt: Format):
    """``x -> dequantize(quantize(x))`` the way a torchao user would write it, or ``None``."""
    if fmt.scaling == "tensor":

        def cast_round_trip(x: torch.Tensor) -> torch.Tensor:
            scale = fmt.max / x.abs().amax().clamp(min=1e-12)
            return (x * scale).clamp(-fmt.max, fmt.max).to(fmt.torch_dtype).float() / scale

        return cast_round_trip
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except ImportError:
        return None
    elem = torchao_mx_dtype(fmt.name)
    if elem is None:
        return None
    return lambda x: MXTensor.to_mx(x, elem, fmt.block_size).dequantize(torch.float32)


def run(
    size: int, repeat: int, formats: list[str] | None = None, use_compile: bool = True
) -> list[dict]:
    """One row per format (default: all) with times in ms; ``use_compile=False`` skips the
    compiled timing (it compiles one graph per format, tens of seconds in all)."""
    torch.manual_seed(0)
    x = torch.randn(size, size)
    clone_ms = best_time(x.clone, repeat)
    rows = []
    for fmt in (FORMATS[name] for name in formats or FORMATS):
        eager = best_time(lambda f=fmt: quantize(x, f), repeat)
        compiled = None
        if use_compile:
            compiled_fn = torch.compile(lambda t, f=fmt: quantize(t, f), dynamic=False)
            compiled = best_time(lambda f=compiled_fn: f(x), repeat)
        peer = torchao_peer(fmt)
        peer_ms = best_time(lambda p=peer: p(x), repeat) if peer else None
        mismatch = (peer(x) != quantize(x, fmt)).float().mean().item() if peer else None
        rows.append(
            {
                "format": fmt.name,
                "peer": ("torch cast" if fmt.scaling == "tensor" else "torchao") if peer else None,
                "ours eager ms": eager,
                "ours compiled ms": compiled,
                "peer ms": peer_ms,
                "clone ms": clone_ms,
                "peer / ours compiled": peer_ms / compiled if peer and compiled else None,
                "peer / ours eager": peer_ms / eager if peer else None,
                "compiled / clone": compiled / clone_ms if compiled else None,
                "eager / clone": eager / clone_ms,
                "mismatch vs peer": mismatch,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the tensor is size x size fp32")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per entry (min)")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    rows = run(args.size, args.repeat)
    print(f"fake quantization of a {args.size}x{args.size} fp32 tensor, "
          f"{torch.get_num_threads()} threads, min of {args.repeat}")
    print_table(rows, list(rows[0]))
    print("wrote", write_json("quantize", rows, size=args.size, repeat=args.repeat))


if __name__ == "__main__":
    main()
