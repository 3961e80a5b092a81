"""LitGPT integration: learnable-multiplier placements for litgpt's ``GPT``."""

from lightning_lowprec.litgpt.placement import litgpt_placement

__all__ = ["litgpt_placement"]
