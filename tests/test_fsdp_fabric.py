"""Fabric + LowPrecision under FSDP2 (ModelParallelStrategy, 2 gloo CPU processes) equals DDP.

With 2 ranks a gradient sum is one commutative fp32 addition, so there is no reduction-order
noise: 10 steps of FSDP2 must land on exactly DDP's parameters (tolerance 0), for AdamW, LMD
(sampled, MXFP6 forward and backward), M+Adam (BF16 storage) and Madam — also across a
validation forward, after which FSDP2 leaves the root module's weights gathered (the next
sample must still reach them).
"""

from __future__ import annotations

import pytest
import torch
from file_spawn import spawn

STEPS = 10


def train(rank: int, strategy: str, kind: str) -> dict[str, torch.Tensor]:
    import lightning as L
    from conftest import make_gpt
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import LMD, LowPrecision, Madam, MPlusAdam, fully_shard_blocks

    s = (ModelParallelStrategy(fully_shard_blocks, data_parallel_size=2, tensor_parallel_size=1)
         if strategy == "fsdp" else "ddp")
    plugins = [LowPrecision("mxfp6_e2m3", quantize_backward=True)] if kind == "lmd" else []
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=s, plugins=plugins)
    fabric.launch()
    model = fabric.setup_module(make_gpt(0))
    build = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "lmd": lambda ps: LMD(ps, seed=1, sigma=0.1),
        "mplus": lambda ps: MPlusAdam(ps, storage="bf16", seed=2),
        "madam": lambda ps: Madam(ps),
    }[kind]
    opt = fabric.setup_optimizers(build(model.parameters()))
    gen = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        x = torch.randint(0, 4096, (4, 17), generator=gen)[2 * rank: 2 * rank + 2]
        if step == 5:  # a validation forward: FSDP2 then keeps the root's weights gathered
            model.eval()
            with torch.no_grad():
                model(x[:, :-1])
            model.train()
        logits = model(x[:, :-1])
        fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))
        opt.step()
        opt.zero_grad()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def rank_main(rank: int, kinds: list[str]) -> None:
    for kind in kinds:
        sharded, ddp = train(rank, "fsdp", kind), train(rank, "ddp", kind)
        for key, value in ddp.items():
            assert torch.equal(sharded[key], value), f"{kind}: {key}"


@pytest.mark.slow  # ~20 s: two processes, 4 optimizers x 2 strategies x 10 steps
def test_fsdp2_equals_ddp_for_every_optimizer(tmp_path):
    spawn(rank_main, tmp_path, ["adamw", "lmd", "mplus", "madam"])


def train_accumulating(rank: int, strategy: str, micro: int = 3, steps: int = 3) -> tuple:
    """LMD (sampled, MXFP6) with ``micro`` micro-batches per step under ``no_backward_sync``;
    returns the full weights and how many spare buffers LMD allocated."""
    import lightning as L
    from conftest import make_gpt
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import LMD, LowPrecision, fully_shard_blocks

    s = (ModelParallelStrategy(fully_shard_blocks, data_parallel_size=2, tensor_parallel_size=1)
         if strategy == "fsdp" else "ddp")
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=s,
                      plugins=[LowPrecision("mxfp6_e2m3")])
    fabric.launch()
    model = fabric.setup_module(make_gpt(0))
    opt = fabric.setup_optimizers(LMD(model.parameters(), seed=1, sigma=0.1))
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for i in range(micro):
            x = torch.randint(0, 4096, (4, 17), generator=gen)[2 * rank: 2 * rank + 2]
            with fabric.no_backward_sync(model, enabled=i < micro - 1):
                logits = model(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                         x[:, 1:].flatten())
                fabric.backward(loss / micro)
        opt.step()
        opt.zero_grad()
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    return weights, len(opt.optimizer._spares)


def rank_main_accumulating(rank: int) -> None:
    (sharded, spares), (ddp, ddp_spares) = train_accumulating(rank, "fsdp"), \
        train_accumulating(rank, "ddp")
    assert spares == ddp_spares > 0  # the shards' samples were swapped, not redrawn
    for key, value in ddp.items():
        assert torch.equal(sharded[key], value), key


@pytest.mark.slow  # ~15 s: two processes, 2 strategies x 3 steps x 3 micro-batches
def test_fsdp2_accumulation_with_spare_buffers_equals_ddp(tmp_path):
    spawn(rank_main_accumulating, tmp_path)
