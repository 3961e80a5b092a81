"""A default ``seed=None`` is the same on every rank of ``torch.distributed`` (two gloo
processes whose global generators differ, as without ``seed_everything``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from file_spawn import spawn

from lightning_lowprec import LMD, MPlusAdam


def rank_main(rank: int, out: str) -> None:
    torch.manual_seed(100 + rank)  # the ranks' global generators differ; weights do not
    w = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    lmd = LMD([w], init="moment_matched")
    mplus = MPlusAdam([torch.nn.Parameter(w.detach().clone())], storage="bf16",
                      rounding="stochastic")
    explicit = LMD([torch.nn.Parameter(w.detach().clone())], seed=rank)
    lmd.sample_()
    seeds = [lmd.param_groups[0]["seed"], mplus.param_groups[0]["seed"],
             explicit.param_groups[0]["seed"]]
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"seeds": seeds, "sample": w.detach().flatten().tolist()}))


@pytest.mark.slow  # ~10 s: two fresh processes import torch
def test_default_seed_is_broadcast_from_rank_0(tmp_path):
    spawn(rank_main, tmp_path, str(tmp_path))
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seeds"][:2] == ranks[1]["seeds"][:2]
    assert ranks[0]["sample"] == ranks[1]["sample"]  # moment-matched init and sample agree
    assert [r["seeds"][2] for r in ranks] == [0, 1]  # an explicit seed is left alone


def test_default_seed_comes_from_the_global_generator_without_distributed():
    w = torch.nn.Parameter(torch.randn(4, 4))
    torch.manual_seed(3)
    a = LMD([w]).param_groups[0]["seed"]
    torch.manual_seed(3)
    assert LMD([w]).param_groups[0]["seed"] == a
    assert MPlusAdam([w]).param_groups[0]["seed"] != a
