"""Clipping that leaves the multipliers out, under FSDP2: the global norm over every rank's
shards of the other gradients, as DDP clips.

2 gloo CPU ranks, the test GPT with the paper's multipliers, ``"32-true"`` (no plugin) and
``FabricExcludeMultipliersFromClipping``, one backward and ``fabric.clip_gradients`` under
``ModelParallelStrategy`` (FSDP2) and under DDP on the same per-rank data. The unclipped
gradients are equal (one commutative fp32 sum over 2 ranks); the clipped ones agree to
``rel=2e-4``: torch's fp32 norm sums whole tensors (DDP) or shards (FSDP2) in different orders,
and on CPU it is up to 6e-5 relative off the float64 norm (measured), which the clip factor
inherits. The multipliers' gradients are not clipped (equal to the unclipped ones, bit for
bit) and not counted in the norm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from file_spawn import spawn

MAX_NORM = 0.05


def step(strategy: str, rank: int) -> dict[str, object]:
    import lightning as L
    from conftest import make_gpt
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import fully_shard_blocks
    from lightning_lowprec.callbacks import FabricExcludeMultipliersFromClipping
    from lightning_lowprec.multipliers import add_multipliers
    from lightning_lowprec.optim.groups import is_multiplier

    s = (ModelParallelStrategy(fully_shard_blocks, data_parallel_size=2, tensor_parallel_size=1)
         if strategy == "fsdp" else "ddp")
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=s,
                      callbacks=[FabricExcludeMultipliersFromClipping()])
    fabric.launch()
    gpt = make_gpt(0)
    add_multipliers(gpt, "paper")
    model = fabric.setup(gpt)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randint(0, 4096, (4, 17), generator=torch.Generator().manual_seed(3))
    x = x[2 * rank: 2 * rank + 2]
    logits = model(x[:, :-1])
    fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))

    def grads() -> dict[str, torch.Tensor]:
        return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for n, p in gpt.named_parameters()}

    before = grads()
    norm = fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return {"before": before, "after": grads(), "norm": float(norm),
            "multipliers": {n for n, p in gpt.named_parameters() if is_multiplier(p)}}


def rank_main(rank: int, out: str) -> None:
    for strategy in ("fsdp", "ddp"):
        result = step(strategy, rank)
        if rank == 0:
            torch.save(result, Path(out) / f"{strategy}.pt")


@pytest.mark.slow  # ~25 s: two 2-process Fabric runs of one step
def test_fsdp2_clips_the_global_norm_without_multipliers_as_ddp_does(tmp_path):
    spawn(rank_main, tmp_path, str(tmp_path))
    fsdp, ddp = (torch.load(tmp_path / f"{s}.pt", weights_only=False) for s in ("fsdp", "ddp"))
    multipliers = ddp["multipliers"]
    assert len(multipliers) == 18 and fsdp["multipliers"] == multipliers  # marks survive sharding
    for name, g in ddp["before"].items():
        assert torch.equal(fsdp["before"][name], g), name
    others = [g for name, g in ddp["before"].items() if name not in multipliers]
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in others))
    with_multipliers = math.sqrt(sum(float(g.double().square().sum())
                                     for g in ddp["before"].values()))
    assert with_multipliers > expected * (1 + 1e-3)  # counting them would show
    for result in (fsdp, ddp):
        assert result["norm"] == pytest.approx(expected, rel=2e-4)
    factor = MAX_NORM / (expected + 1e-6)
    assert factor < 0.5
    for name, g in ddp["before"].items():
        if name in multipliers:
            assert torch.equal(fsdp["after"][name], g), name
            assert torch.equal(ddp["after"][name], g), name
        else:
            torch.testing.assert_close(fsdp["after"][name], ddp["after"][name], rtol=2e-4,
                                       atol=0, msg=name)
            torch.testing.assert_close(fsdp["after"][name], g * factor, rtol=2e-4, atol=0,
                                       msg=name)
