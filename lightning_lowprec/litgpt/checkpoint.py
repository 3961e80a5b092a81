"""Offline LitGPT checkpoints: a random-init model with a tokenizer trained on local text.

LitGPT's recipes start from a checkpoint directory (``lit_model.pth``, ``model_config.yaml``,
``tokenizer.json``, ``tokenizer_config.json``). Tests, demos and CPU smoke runs need one without
a download, so :func:`make_checkpoint` builds it: a byte-level BPE trained (in about a second)
on the standard library's docstrings, and a freshly initialised ``litgpt.GPT`` from a named
config with the vocabulary swapped for the tokenizer's. :func:`write_instruction_data` writes a
matching toy instruction set in LitGPT's JSON format (``--data JSON --data.json_path ...``).
:func:`make_default` lays out all of it where the ``tiny-finetune`` / ``tiny-pretrain``
recipe overrides look (``lowprec-litgpt make_default``).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_DIR",
    "make_checkpoint",
    "make_default",
    "stdlib_docstrings",
    "train_tokenizer",
    "write_instruction_data",
]

DEFAULT_DIR = Path("lowprec-default")
"""Where :func:`make_default` writes, relative to the working directory (the ``tiny-*``
overrides' paths)."""
VAL_EVERY = 10
"""Every 10th example (instruction or docstring) goes to the validation split."""

EOS_TOKEN = "<|endoftext|>"
DOCSTRING_MODULES = (
    "argparse", "collections", "functools", "inspect", "itertools", "json", "logging",
    "pathlib", "re", "string", "subprocess", "textwrap", "typing", "unittest",
)
"""Standard-library modules whose docstrings make the offline corpus (present everywhere)."""


def stdlib_docstrings(modules: Iterable[str] = DOCSTRING_MODULES) -> dict[str, str]:
    """``{"module.name": docstring}`` for the public members of ``modules`` (deduplicated)."""
    docs: dict[str, str] = {}
    seen: set[str] = set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        members = [(module_name, module)] + [
            (f"{module_name}.{name}", getattr(module, name))
            for name in sorted(vars(module)) if not name.startswith("_")
        ]
        for name, obj in members:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs[name] = doc
    return docs


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as its only special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def make_checkpoint(
    out_dir: str | Path,
    model_name: str = "pythia-14m",
    vocab_size: int = 4096,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a random-init LitGPT checkpoint directory and return its path.

    Args:
        out_dir: the directory to create (parents included).
        model_name: a ``litgpt.Config`` name; only its architecture is used.
        vocab_size: the tokenizer's vocabulary, also the model's (padded) vocabulary.
        seed: torch seed of the weight initialisation.
        config_overrides: further ``Config.from_name`` overrides (``n_layer=2``, ...).
    """
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(stdlib_docstrings().values(), vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
    }, indent=2))
    config = Config.from_name(
        model_name, **{"vocab_size": vocab_size, "padded_vocab_size": vocab_size,
                       **config_overrides}
    )
    torch.manual_seed(seed)
    model = GPT(config)
    model.apply(model._init_weights)
    torch.save(model.state_dict(), out / "lit_model.pth")
    save_config(config, out)
    return out


def write_instruction_data(path: str | Path, examples: int = 256) -> Path:
    """A toy instruction set in LitGPT's JSON format: "describe X" -> X's first doc paragraph."""
    rows = [_instruction(name, doc) for name, doc in list(stdlib_docstrings().items())[:examples]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def make_default(directory: str | Path = DEFAULT_DIR) -> dict[str, Path]:
    """The built-in default the ``tiny-*`` overrides run on, made from the standard library's
    docstrings.

    Writes (once; an existing complete directory is reused):

    * ``checkpoint/``: a random-init pythia-14m-architecture GPT with a 4096-token BPE
      (:func:`make_checkpoint`), the ``checkpoint_dir`` of ``tiny-finetune`` and the
      ``tokenizer_dir`` of ``tiny-pretrain``;
    * ``instructions/train.json``, ``instructions/val.json``: "describe X" -> X's doc
      (``--data JSON --data.json_path DIR/instructions``), every 10th example for validation;
    * ``text/train/docstrings.txt``, ``text/val/docstrings.txt``: the docstrings as plain text
      (``--data TextFiles``), split the same way.

    Returns:
        The paths, by the names above (``checkpoint``, ``instructions``, ``text_train``,
        ``text_val``).
    """
    root = Path(directory)
    paths = {
        "checkpoint": root / "checkpoint",
        "instructions": root / "instructions",
        "text_train": root / "text" / "train",
        "text_val": root / "text" / "val",
    }
    stamp = root / ".complete"
    if stamp.is_file():
        return paths
    make_checkpoint(paths["checkpoint"])
    docs = list(stdlib_docstrings().items())
    splits = {
        "train": [d for i, d in enumerate(docs) if i % VAL_EVERY],
        "val": [d for i, d in enumerate(docs) if not i % VAL_EVERY],
    }
    paths["instructions"].mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        rows = [_instruction(name, doc) for name, doc in items]
        (paths["instructions"] / f"{split}.json").write_text(json.dumps(rows, indent=1))
        text_dir = paths[f"text_{split}"]
        text_dir.mkdir(parents=True, exist_ok=True)
        (text_dir / "docstrings.txt").write_text("\n\n".join(doc for _, doc in items))
    stamp.write_text("")
    return paths


def _instruction(name: str, doc: str) -> dict[str, str]:
    return {
        "instruction": f"Describe `{name}` in one sentence.",
        "input": "",
        "output": doc.split("\n\n")[0].replace("\n", " "),
    }
