"""Shared fixtures: a tiny litgpt GPT, a byte-level token stream, and a LightningModule.

Text comes from ``../shared/data/tinyshakespeare.txt`` when that file exists (the project's
workspace) and otherwise from the standard library's docstrings, so that a fresh clone runs
the same tests with no download.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lowprec.litgpt.checkpoint import stdlib_docstrings
from lightning_lowprec.optim import base

# The optimizers' default compiled="auto" takes the eager kernels here and in every process a
# test starts (they inherit the environment): compiling costs seconds per kernel, up to a
# minute cold, and most tests check behaviour, not the kernels. Tests marked ``auto_compile``
# run the real default; those that pass ``compiled=True`` compile as before.
os.environ.setdefault(base.COMPILE_ENV, "0")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SEQ_LEN = 64
BATCH_SIZE = 8
TEXT_CHARS = 200_000
BLOCK_LINEARS = [
    f"transformer.h.{block}.{name}"
    for block in range(2)
    for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
]
"""The Linear layers of make_gpt()'s transformer blocks, in module order (lm_head is apart)."""


def load_text() -> str:
    """About 200k characters of English-like text."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:TEXT_CHARS]
    return "\n\n".join(stdlib_docstrings().values())[:TEXT_CHARS]


def gpt_config(**overrides):
    """pythia-14m with a 4096-token vocabulary, cut to 2 layers and 64 positions for speed."""
    from litgpt import Config  # imported here: the other test modules do not need litgpt

    kwargs = {"vocab_size": 4096, "padded_vocab_size": 4096, "n_layer": 2, "block_size": SEQ_LEN}
    return Config.from_name("pythia-14m", **{**kwargs, **overrides})


def make_gpt(seed: int = 0):
    """A freshly initialised litgpt GPT (1.4M parameters)."""
    from litgpt import GPT

    torch.manual_seed(seed)
    return GPT(gpt_config())


class TokenWindows(Dataset):
    """Non-overlapping (input, next-token target) windows of ``SEQ_LEN`` bytes."""

    def __init__(self, tokens: torch.Tensor, windows: int) -> None:
        self.tokens = tokens
        self.windows = min(windows, (len(tokens) - 1) // SEQ_LEN)

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * SEQ_LEN
        chunk = self.tokens[start : start + SEQ_LEN + 1]
        return chunk[:-1], chunk[1:]


class GPTModule(L.LightningModule):
    """A litgpt GPT trained on next-token prediction; records its training losses."""

    def __init__(self, seed: int = 0, lr: float = 3e-3) -> None:
        super().__init__()
        self.gpt = make_gpt(seed)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens)

    def loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        logits = self.gpt(inputs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch, batch_idx):
        return self.gpt(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where there is no CUDA device: CI never needs a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu.py on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_compile(request, monkeypatch):
    """Tests marked ``auto_compile``: ``compiled="auto"`` probes ``torch.compile`` afresh."""
    if request.node.get_closest_marker("auto_compile") is not None:
        monkeypatch.setenv(base.COMPILE_ENV, "1")
        monkeypatch.setattr(base, "_COMPILE_WORKS", {})


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.tensor(list(load_text().encode("utf-8")), dtype=torch.long)


@pytest.fixture
def loader(tokens) -> DataLoader:
    """64 windows in batches of 8: 8 steps per epoch."""
    return DataLoader(TokenWindows(tokens, 64), batch_size=BATCH_SIZE)


def trainer_kwargs(**overrides) -> dict:
    """A quiet single-process CPU Trainer configuration."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return {**kwargs, **overrides}
