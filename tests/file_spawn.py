"""Run a function in 2 gloo CPU processes that rendezvous through a file, not a TCP port.

Why a file: a free port picked by the parent can be taken by another process before the
children bind it (a suspected cause of a gloo worker's SIGABRT); ``file://`` in the test's
``tmp_path`` cannot collide. The children also get the torchelastic variables, so Lightning's
``Fabric``/``Trainer`` see their ranks, find the process group initialised and use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def spawn(fn: Callable[..., None], tmp_path: Path, *args: Any) -> None:
    """``fn(rank, *args)`` in each of :data:`WORLD` processes, the process group initialised."""
    init = tmp_path / f"rendezvous_{os.getpid()}_{len(list(tmp_path.glob('rendezvous_*')))}"
    mp.spawn(_worker, args=(fn, str(init), args), nprocs=WORLD, join=True)


def _worker(rank: int, fn: Callable[..., None], init: str, args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0", TORCHELASTIC_RUN_ID="test",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        # No rank tears its connections down while a peer still reads its last collective
        # (gloo then aborts the peer: "terminate called without an active exception"). A
        # rank that raised skips this; ``mp.spawn`` reports it and stops the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()
