"""The Trainer recipe for FSDP2: ``ModelParallelStrategy`` with ``fully_shard_blocks`` called in
``configure_model`` (the plugin has converted the layers by then), LMD sampled, MXFP6 — 5 steps
on 2 gloo ranks land on exactly DDP's parameters (with 2 ranks a gradient sum is one
commutative fp32 addition, so the tolerance is 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TRAINER_SCRIPT = '''
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from litgpt import GPT, Config
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowprec import LMD, LowPrecisionPlugin, fully_shard_blocks


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(Config.from_name("pythia-14m", vocab_size=4096, padded_vocab_size=4096,
                                        n_layer=2, block_size=32))

    def configure_model(self):
        if sys.argv[1] == "fsdp":
            fully_shard_blocks(self.gpt, self.device_mesh)

    def training_step(self, batch, _):
        (x,) = batch
        logits = self.gpt(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return LMD(self.parameters(), seed=7, lr=0.02, sigma=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = torch.randint(0, 4096, (40, 33), generator=torch.Generator().manual_seed(1))
    t = L.Trainer(accelerator="cpu", devices=2, max_steps=5, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  strategy=(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                            if sys.argv[1] == "fsdp" else "ddp"),
                  plugins=[LowPrecisionPlugin("mxfp6_e2m3")])
    m = M()
    t.fit(m, DataLoader(TensorDataset(data), batch_size=4))
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in m.gpt.named_parameters()}
    if t.global_rank == 0:
        torch.save({"params": full, "modules": sorted({type(x).__name__ for x in m.modules()})},
                   sys.argv[2])
'''


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name}"


@pytest.mark.slow  # ~50 s: two 2-process Trainer runs (FSDP2 and DDP) of 5 steps
def test_trainer_lmd_fsdp2_in_configure_model_equals_ddp(tmp_path):
    """The Trainer recipe: ``fully_shard_blocks(self.gpt, self.device_mesh)`` in
    ``configure_model`` (the plugin has converted the layers by then), LMD sampled, MXFP6."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("fsdp", "ddp"):
        out = tmp_path / f"trainer_{mode}.pt"
        proc = subprocess.run([sys.executable, str(script), mode, str(out)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[mode] = torch.load(out, weights_only=False)
    assert {"FSDPGPT", "FSDPBlock", "QuantizedLinear"} <= set(results["fsdp"]["modules"])
    assert_same(results["fsdp"]["params"], results["ddp"]["params"], "Trainer FSDP2 vs DDP")
