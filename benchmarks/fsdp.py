"""Bytes of parameters + optimizer state per rank: FSDP2 against DDP, on 2 ranks.

Under DDP every rank holds the whole model and the whole optimizer state; FSDP2
(``ModelParallelStrategy(fully_shard_blocks, ...)``) holds a dim-0 shard of each parameter and,
since the optimizers keep their state as ``DTensor`` shards laid out like the parameters, a
shard of the state. This benchmark sets up a pythia-14m-shaped litgpt ``GPT`` (vocabulary
4096) with Fabric on 2 gloo CPU processes under each strategy, takes one optimizer step (so
that the state exists) with AdamW, LMD, M+Adam and Madam at their defaults (eager kernels:
memory does not depend on the kernel), and counts on every rank the bytes of the local
parameter tensors and of every tensor in the optimizer state (``DTensor``s by their local
shard). The ratio is FSDP2's worst rank over DDP's per-rank bytes; the target is ≤ 0.55
(half, plus the replicated scalars and uneven shards). Peak memory during forward/backward
(FSDP2's all-gathered block) is not part of it.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.fsdp [--quick] [--out DIR]`` (``--quick``: 2
layers instead of 6). Prints a table; writes ``fsdp.json`` to ``benchmarks/results/`` or
``--out``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import timing
from benchmarks.timing import print_table

WORLD = 2
TARGET = 0.55
OPTIMIZERS = ("AdamW", "LMD", "M+Adam", "Madam")
COLUMNS = ["optimizer", "DDP params MB", "DDP state MB", "FSDP2 params MB", "FSDP2 state MB",
           "x DDP", "target"]


def build_optimizer(name: str, params):  # noqa: ANN001, ANN201
    from lightning_lowprec import LMD, Madam, MPlusAdam

    return {
        "AdamW": lambda: torch.optim.AdamW(params, lr=1e-3),
        "LMD": lambda: LMD(params, seed=0, compiled=False),
        "M+Adam": lambda: MPlusAdam(params, seed=0, compiled=False),
        "Madam": lambda: Madam(params, compiled=False),
    }[name]()


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t`` (a ``DTensor`` by its local shard)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(strategy: str, optimizer_name: str, n_layer: int, rank: int) -> dict[str, int]:
    """Set up, take one step, count this rank's parameter and optimizer-state bytes."""
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy
    from litgpt import GPT, Config

    from lightning_lowprec import fully_shard_blocks

    s = (ModelParallelStrategy(fully_shard_blocks, data_parallel_size=WORLD,
                               tensor_parallel_size=1) if strategy == "FSDP2" else "ddp")
    fabric = L.Fabric(accelerator="cpu", devices=WORLD, strategy=s)
    fabric.launch()
    torch.manual_seed(0)
    config = Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096,
                              n_layer=n_layer, block_size=64)
    model = fabric.setup(GPT(config))
    optimizer = fabric.setup_optimizers(build_optimizer(optimizer_name, model.parameters()))
    x = torch.randint(0, 4096, (2, 33), generator=torch.Generator().manual_seed(rank))
    logits = model(x[:, :-1])
    fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = sum(local_bytes(p) for p in model.parameters())
    state = sum(local_bytes(v) for s_ in optimizer.optimizer.state.values()
                for v in s_.values() if torch.is_tensor(v))
    return {"params": params, "state": state}


def worker(rank: int, init: str, n_layer: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0", TORCHELASTIC_RUN_ID="fsdp",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    torch.set_num_threads(1)
    # A file rendezvous: no free TCP port to race for.
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        result = {(strategy, name): measure(strategy, name, n_layer, rank)
                  for name in OPTIMIZERS for strategy in ("DDP", "FSDP2")}
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # As tests/file_spawn.py: no rank tears its connections down while its peer still
        # reads the last collective (gloo then aborts the peer with SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rows_from(per_rank: list[dict]) -> list[dict]:
    mb = 1 / 2**20
    rows = []
    for name in OPTIMIZERS:
        ddp = max(r[("DDP", name)]["params"] + r[("DDP", name)]["state"] for r in per_rank)
        worst = max(per_rank, key=lambda r: r[("FSDP2", name)]["params"]
                    + r[("FSDP2", name)]["state"])
        fsdp = worst[("FSDP2", name)]
        ratio = (fsdp["params"] + fsdp["state"]) / ddp
        rows.append({
            "optimizer": name,
            "DDP params MB": per_rank[0][("DDP", name)]["params"] * mb,
            "DDP state MB": per_rank[0][("DDP", name)]["state"] * mb,
            "FSDP2 params MB": fsdp["params"] * mb,
            "FSDP2 state MB": fsdp["state"] * mb,
            "x DDP": ratio,
            "target": "met" if ratio <= TARGET else "missed",
            "bytes_per_rank": {f"rank{i}": {f"{s} {k}": v for (s, n), d in r.items()
                                            if n == name for k, v in d.items()}
                               for i, r in enumerate(per_rank)},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 6")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for fsdp.json (default benchmarks/results)")
    args = parser.parse_args()
    if args.out is not None:
        timing.RESULTS_DIR = args.out.resolve()
    n_layer = 2 if args.quick else 6
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(str(Path(tmp) / "rendezvous"), n_layer, tmp), nprocs=WORLD,
                 join=True)
        per_rank = [torch.load(Path(tmp) / f"rank{i}.pt") for i in range(WORLD)]
    rows = rows_from(per_rank)
    print_table(rows, COLUMNS)
    path = timing.write_json("fsdp", rows, model="pythia-14m (vocab 4096)", n_layer=n_layer,
                             world_size=WORLD, target=TARGET)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
