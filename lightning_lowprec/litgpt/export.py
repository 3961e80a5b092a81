"""``lowprec-litgpt export_mx CHECKPOINT_DIR [--fmt FMT]``: a packed MX copy of a LitGPT checkpoint.

Writes ``CHECKPOINT_DIR/lit_model.mx.safetensors`` (:func:`lightning_lowprec.export.export_mx`)
beside litgpt's ``lit_model.pth``, with the formats the run trained with: the ``fmt``,
``include`` and ``exclude`` of the ``lowprec.yaml`` that ``lowprec-litgpt`` saved there, unless
``--fmt`` (a format name, or a YAML mapping ``{pattern: format}``) says otherwise, and always
its ``scale_rule`` (the MX block scales the run quantized with; ``floor`` if none is recorded). The
checkpoint's multipliers are already merged into its weights, so the packed weights are the
ones the training forward quantized.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_lowprec.export import export_mx
from lightning_lowprec.litgpt.options import SECTION
from lightning_lowprec.litgpt.runner import OPTIONS_FILE
from lightning_lowprec.nn import DEFAULT_EXCLUDE

__all__ = ["EXPORT_FILE", "export_checkpoint", "main"]

EXPORT_FILE = "lit_model.mx.safetensors"


def export_checkpoint(checkpoint_dir: str | Path, fmt: Any = None) -> dict[str, Any]:
    """Export ``checkpoint_dir``'s ``lit_model.pth`` packed; return a summary.

    Args:
        checkpoint_dir: a LitGPT checkpoint directory (``lit_model.pth``, ``model_config.yaml``).
        fmt: a format name or ``{pattern: format}`` mapping; ``None`` takes ``lowprec.fmt``
            (and ``include``/``exclude``) from the directory's ``lowprec.yaml``.

    Returns:
        ``{"path", "bytes", "source_bytes", "seconds", "formats"}`` (``formats``: how many
        weights each format packed).

    Raises:
        ValueError: no such checkpoint, or no format given and none recorded.
    """
    from litgpt import GPT, Config

    directory = Path(checkpoint_dir)
    source = directory / "lit_model.pth"
    if not source.is_file() or not (directory / "model_config.yaml").is_file():
        raise ValueError(
            f"{directory} is not a LitGPT checkpoint directory (needs lit_model.pth and "
            "model_config.yaml)."
        )
    section = _recorded_section(directory)
    include, exclude = section.get("include"), section.get("exclude", DEFAULT_EXCLUDE)
    if fmt is None:
        fmt = section.get("fmt")
    if fmt is None:
        raise ValueError(
            f"No format to export {directory} in: its {OPTIONS_FILE} records none (the run "
            "trained unquantized). Pass --fmt, e.g. --fmt mxfp6_e2m3."
        )
    start = time.perf_counter()
    model = GPT(Config.from_file(directory / "model_config.yaml"))
    state = torch.load(source, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    path = directory / EXPORT_FILE
    formats = export_mx(model, fmt, path, include=include, exclude=exclude,
                        scale_rule=section.get("scale_rule", "floor"))
    counts: dict[str, int] = {}
    for name in formats.values():
        counts[name] = counts.get(name, 0) + 1
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "source_bytes": source.stat().st_size,
        "seconds": time.perf_counter() - start,
        "formats": counts,
    }


def main(args: Sequence[str]) -> None:
    """``lowprec-litgpt export_mx`` (arguments after the command name)."""
    parser = argparse.ArgumentParser(
        prog="lowprec-litgpt export_mx", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoint_dir", type=Path, help="e.g. out/finetune/final")
    parser.add_argument(
        "--fmt", type=yaml.safe_load, default=None,
        help="format name or YAML mapping {pattern: format}; default: lowprec.yaml's fmt",
    )
    parsed = parser.parse_args(list(args))
    print(json.dumps(export_checkpoint(parsed.checkpoint_dir, parsed.fmt), indent=1))


def _recorded_section(directory: Path) -> dict[str, Any]:
    """The ``lowprec`` section recorded beside the checkpoint (``{}`` if there is none)."""
    path = directory / OPTIONS_FILE
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get(SECTION) or {}
