"""Speed of the fake quantizer against torchao's MX emulation and the memory-bound limit.

For a ``size x size`` tensor and a ragged ``size x (size - 95)`` one (4096 x 4001 by default:
the short last block of every row), fp32 and bf16, and every format, times ``quantize`` eager
and under ``torch.compile``, and the peer a user would pick: torchao's
``MXTensor.to_mx(x, dtype, 32).dequantize()`` where torchao has the format (it needs whole
blocks, so not on the ragged shape; MXINT8 has none), and for the per-tensor formats a scaled
``.to(torch.float8_*)`` round trip whose scale ``max / amax`` is one true division, as ours.
The baseline is ``copy_`` into a preallocated tensor of the input's dtype, which reads and
writes the bytes any element-wise kernel must; ``clone()`` is listed too, as it adds the
page faults of a fresh output (~4x ``copy_`` for 64 MiB on Linux CPUs without transparent
huge pages, see ``THP_MEM_ALLOC_ENABLE``), which every out-of-place op, ours and the
peer's, pays. Also reports the fraction of elements on
which ours and the peer disagree (both round to nearest-even, so this should be 0).

glibc hands every freed buffer of 32 MiB and more back to the kernel and faults the next one
in page by page: on this kind of machine a 64 MiB fp32 output then costs ~35 ms (6-8x
``copy_``) before any arithmetic, in every out-of-place op, so a kernel's cost is invisible.
By default the benchmark asks glibc (``mallopt``) to keep freed memory for reuse, as
PyTorch's caching allocators on accelerators (and jemalloc / tcmalloc on CPU) do, so that the
times are the kernels'; ``--return-freed-memory`` keeps glibc's default (the
page-fault-bound numbers, where ``clone()`` is the floor).

Run: ``python -m benchmarks.quantize [--size 4096] [--repeat 5] [--no-compile]
[--return-freed-memory]``.
"""

from __future__ import annotations

import argparse
import ctypes

import torch

from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec.formats import FORMATS, Format
from lightning_lowprec.quantizer import _tensor_amax_floor, quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (``malloc.h``)."""


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory (no ``mmap`` per large buffer, no trimming): the next
    buffer of the same size reuses the pages instead of faulting fresh ones in. Returns
    whether it took effect (``False`` off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


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


def torchao_peer(fmt: Format, shape: tuple[int, ...]):
    """``x -> dequantize(quantize(x))`` the way a torchao user would write it, or ``None``."""
    if fmt.scaling == "tensor":

        def cast_round_trip(x: torch.Tensor) -> torch.Tensor:
            amax = x.abs().amax().float().clamp(min=_tensor_amax_floor(fmt))
            # torch.div, not `fmt.max / amax`: that multiplies by the reciprocal, rounding
            # twice, and the scale then differs from the spec's on some tensors.
            scale = torch.div(torch.full_like(amax, fmt.max), amax)
            y = (x.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.torch_dtype).float()
            return (y / scale).to(x.dtype)

        return cast_round_trip
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except ImportError:
        return None
    elem = torchao_mx_dtype(fmt.name)
    if elem is None or shape[-1] % fmt.block_size:
        return None
    return lambda x: MXTensor.to_mx(x, elem, fmt.block_size).dequantize(x.dtype)


def run(
    size: int,
    repeat: int,
    formats: list[str] | None = None,
    use_compile: bool = True,
    dtypes: tuple[str, ...] = tuple(DTYPES),
) -> list[dict]:
    """One row per shape, dtype and format (default: all) with times in ms; ``use_compile=False``
    skips the compiled timing (one graph per format, shape and dtype: minutes in all)."""
    rows = []
    for shape in ((size, size), (size, size - 95)):
        for dtype_name in dtypes:
            torch.manual_seed(0)
            x = torch.randn(shape).to(DTYPES[dtype_name])
            buffer = torch.empty_like(x)
            copy_ms = best_time(lambda b=buffer, x=x: b.copy_(x), repeat)
            clone_ms = best_time(x.clone, repeat)
            for fmt in (FORMATS[name] for name in formats or FORMATS):
                row = _row(x, fmt, dtype_name, copy_ms, repeat, use_compile)
                rows.append({**row, "clone ms": clone_ms})
    return rows


def _row(x, fmt, dtype_name, copy_ms, repeat, use_compile) -> dict:
    eager = best_time(lambda: quantize(x, fmt), repeat)
    compiled = None
    if use_compile:
        compiled_fn = torch.compile(lambda t, f=fmt: quantize(t, f), dynamic=False)
        compiled = best_time(lambda: compiled_fn(x), repeat)
    peer = torchao_peer(fmt, tuple(x.shape))
    peer_ms = best_time(lambda: peer(x), repeat) if peer else None
    mismatch = (peer(x) != quantize(x, fmt)).float().mean().item() if peer else None
    return {
        "format": fmt.name,
        "shape": "x".join(map(str, x.shape)),
        "dtype": dtype_name,
        "peer": ("torch cast" if fmt.scaling == "tensor" else "torchao") if peer else None,
        "ours eager ms": eager,
        "ours compiled ms": compiled,
        "peer ms": peer_ms,
        "copy_ ms": copy_ms,
        "eager / copy_": eager / copy_ms,
        "compiled / copy_": compiled / copy_ms if compiled else None,
        "peer / ours eager": peer_ms / eager if peer else None,
        "peer / ours compiled": peer_ms / compiled if peer and compiled else None,
        "mismatch vs peer": mismatch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096,
                        help="the tensors are size x size and size x (size - 95)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per entry (min)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--formats", nargs="*", choices=list(FORMATS), help="default: all")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="keep glibc's default of unmapping freed large buffers (every "
                        "fresh output then page-faults)")
    args = parser.parse_args()
    reuse = not args.return_freed_memory and keep_freed_memory()
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    rows = run(args.size, args.repeat, args.formats, not args.no_compile)
    memory = "freed memory reused" if reuse else "freed memory unmapped (page faults)"
    print(f"fake quantization, {torch.get_num_threads()} threads, min of {args.repeat} "
          f"(wall ms), {memory}")
    print_table(rows, list(rows[0]))
    path = write_json("quantize", rows, size=args.size, repeat=args.repeat,
                      reuse_freed_memory=reuse)
    print("wrote", path)


if __name__ == "__main__":
    main()
