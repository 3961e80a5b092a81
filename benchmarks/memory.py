"""Peak temporary memory of a function on CPU, from the profiler's allocation events.

CPU tensors have no ``torch.cuda.max_memory_allocated``; the profiler, with
``profile_memory=True``, records every allocation and free of the CPU allocator with its size.
Summing them in time order gives the live bytes the call allocated at each moment; the
maximum is its peak temporary memory (bytes still held at the end, e.g. optimizer state created
by a first step, count too: measure after a warm-up step). On CUDA the allocator's own peak
counter is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_extra_bytes"]


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The most bytes that ``fn()`` held allocated at once beyond what existed before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
