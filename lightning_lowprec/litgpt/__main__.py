"""``python -m lightning_lowprec.litgpt``: the ``lowprec-litgpt`` console script."""

from lightning_lowprec.litgpt.runner import main

main()
