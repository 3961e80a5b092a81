"""FabricNormMonitor under FSDP2 logs the global numbers: those of DDP and of one process.

2 gloo CPU ranks train the test GPT (multipliers, LMD sampled, MXFP6) under
``ModelParallelStrategy`` (FSDP2) and under DDP on the same per-rank data, and one process
trains it on the whole global batch. Every scalar and histogram the monitor logs must agree:

* FSDP2 vs DDP: the parameters are equal (2 ranks: one commutative fp32 gradient sum), so the
  only difference is the order of the monitor's float64 sums: ``rel=1e-9`` for the scalars,
  bucket counts equal;
* FSDP2 vs one process: the single process's gradient is the mean over 4 sequences, DDP's the
  mean of two means over 2 (equal in exact arithmetic; fp32 rounding moves the weights by
  ~1e-7 relative per step), so ``rel=1e-4, abs=1e-4`` (a fraction of an element or two of
  the smallest layers);

and only rank 0 writes (a TensorBoard log directory shared by both ranks gets one event file).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from file_spawn import spawn

STEPS = 4
EVERY = 2


class Recording:
    """A Fabric logger that keeps what it is given (also its ``add_histogram_raw`` calls)."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.histograms: dict[str, dict[int, tuple[Any, ...]]] = {}

    # the Logger interface Fabric and the monitor use
    name, version, root_dir, log_dir, group_separator = "recording", 0, None, None, "/"

    @property
    def experiment(self) -> Recording:
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.scalars.setdefault(key, {})[step] = value

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_histogram_raw(self, tag: str, *args: Any, global_step: int) -> None:
        self.histograms.setdefault(tag, {})[global_step] = args

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


def train(strategy: str, rank: int, tb_dir: Path | None = None) -> dict[str, Any]:
    import lightning as L
    from conftest import make_gpt
    from lightning.fabric.loggers import TensorBoardLogger
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lowprec import LMD, LowPrecision, fully_shard_blocks
    from lightning_lowprec.callbacks import FabricNormMonitor
    from lightning_lowprec.multipliers import add_multipliers
    from lightning_lowprec.optim import param_groups

    recording = Recording()
    loggers: list[Any] = [recording]
    if tb_dir is not None:
        loggers.append(TensorBoardLogger(tb_dir, name="fsdp"))
    kwargs: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    if strategy == "fsdp":
        kwargs.update(devices=2, strategy=ModelParallelStrategy(
            fully_shard_blocks, data_parallel_size=2, tensor_parallel_size=1))
    elif strategy == "ddp":
        kwargs.update(devices=2, strategy="ddp")
    fabric = L.Fabric(**kwargs, plugins=[LowPrecision("mxfp6_e2m3", quantize_backward=True)],
                      loggers=loggers,
                      callbacks=[FabricNormMonitor(every_n_steps=EVERY, histograms=True)])
    fabric.launch()
    gpt = make_gpt(0)
    add_multipliers(gpt, "paper")
    model = fabric.setup(gpt)
    optimizer = fabric.setup_optimizers(
        LMD(param_groups(model, weight_decay=0.1), lr=0.02, seed=1, sigma=0.1))
    gen = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        x = torch.randint(0, 4096, (4, 17), generator=gen)
        if strategy != "single":
            x = x[2 * rank: 2 * rank + 2]
        logits = model(x[:, :-1])
        fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                          x[:, 1:].flatten()))
        # The monitor reads the gradients here; a bound this high leaves them as they are
        # (torch's fp32 norm differs between whole tensors and shards in the last digits).
        fabric.clip_gradients(model, optimizer, max_norm=1e9)
        optimizer.step()
        optimizer.zero_grad()
    return {"scalars": recording.scalars, "histograms": recording.histograms}


def rank_main(rank: int, out: str) -> None:
    for strategy in ("fsdp", "ddp"):
        tb_dir = Path(out) / "tb" if strategy == "fsdp" else None
        torch.save(train(strategy, rank, tb_dir), Path(out) / f"{strategy}_{rank}.pt")


def assert_close(ours: dict[str, Any], reference: dict[str, Any], rel: float, abs_: float,
                 what: str) -> None:
    assert ours["scalars"].keys() == reference["scalars"].keys(), what
    for tag, by_step in reference["scalars"].items():
        assert ours["scalars"][tag].keys() == by_step.keys(), (what, tag)
        for step, value in by_step.items():
            got = ours["scalars"][tag][step]
            assert got == pytest.approx(value, rel=rel, abs=abs_) or (
                math.isinf(value) and got == value), (what, tag, step, got, value)
    assert ours["histograms"].keys() == reference["histograms"].keys(), what
    for tag, by_step in reference["histograms"].items():
        for step, (low, high, num, total, squares, _limits, counts) in by_step.items():
            got = ours["histograms"][tag][step]
            assert got[2] == num, (what, tag)
            assert got[:2] + got[3:5] == pytest.approx((low, high, total, squares),
                                                       rel=rel, abs=abs_), (what, tag)
            if abs_ == 0:  # the same weights: the same buckets
                assert list(got[6]) == list(counts), (what, tag)
            else:  # a weight or two may cross a bucket edge
                assert sum(abs(a - b) for a, b in zip(got[6], counts, strict=True)) <= 4


@pytest.mark.slow  # ~40 s: two 2-process Fabric runs of 4 steps and one single-process run
def test_fsdp2_monitor_logs_what_ddp_and_one_process_log(tmp_path):
    spawn(rank_main, tmp_path, str(tmp_path))
    fsdp, ddp = (torch.load(tmp_path / f"{s}_0.pt", weights_only=False) for s in ("fsdp", "ddp"))
    for strategy in ("fsdp", "ddp"):  # only rank 0 logs
        rank1 = torch.load(tmp_path / f"{strategy}_1.pt", weights_only=False)
        assert rank1 == {"scalars": {}, "histograms": {}}
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    assert set(fsdp["scalars"]["norm/weight/global"]) == {EVERY, STEPS}
    assert any(tag.startswith("quant/") and tag.endswith("act_sqnr_db") for tag in fsdp["scalars"])
    assert any(tag.endswith("sign_flip_frac") for tag in fsdp["scalars"])
    assert_close(fsdp, ddp, rel=1e-9, abs_=0.0, what="FSDP2 vs DDP")
    single = train("single", 0)
    assert_close(fsdp, single, rel=1e-4, abs_=1e-4, what="FSDP2 vs one process")
