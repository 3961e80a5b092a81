"""What the plugin's posterior sampler costs per forward and per ``state_dict()``, against none.

The sampler (``lightning_lowprec.sampling``) decides at every forward of a Fabric-set-up
module whether it runs at a sample (a forward pre-hook that finds the module's posterior
optimizers), and guards every ``state_dict()`` of it (a pre- and a post-hook). Rows, for litgpt
GPTs of pythia shapes (4096-token vocabulary) under ``LowPrecision("mxfp6_e2m3")`` and LMD:

* ``hook_us``: one forward pre-hook call, sample held (the cached decision and the idempotent
  ``sample_()`` that returns at once); ``hook_uncached_us``: the same with the owner cache
  emptied first (a walk over every parameter);
* ``forward_ms``: an eval forward of one 64-token sequence (the peer the hook is added to),
  and ``hook / forward``;
* ``state_dict_ms`` with the hooks, ``plain_state_dict_ms`` for the same model never set up.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.sampler [--models pythia-14m pythia-160m]``.
Prints a table; writes ``benchmarks/results/sampler.json``. Times are minima over repeats.
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch

from benchmarks.timing import best_time, print_table, write_json
from lightning_lowprec import LMD, LowPrecision


def measure(name: str) -> dict:
    from litgpt import GPT, Config

    torch.manual_seed(0)
    gpt = GPT(Config.from_name(name, vocab_size=4096, padded_vocab_size=4096))
    plain = copy.deepcopy(gpt)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[LowPrecision("mxfp6_e2m3")])
    model, optimizer = fabric.setup(gpt, LMD(gpt.parameters(), seed=0))
    sampler = fabric.strategy.precision._sampler
    inner = optimizer.optimizer
    inner.sample_()
    calls = 1000

    def hooks() -> None:
        for _ in range(calls):
            sampler._before_forward(gpt, ())

    def uncached() -> None:
        for _ in range(calls // 10):
            sampler._owners.clear()
            sampler._before_forward(gpt, ())

    hook_us = best_time(hooks) * 1e3 / calls
    uncached_us = best_time(uncached) * 1e3 / (calls // 10)
    inner.restore_()
    tokens = torch.randint(0, 4096, (1, 64))
    gpt.eval()
    with torch.no_grad():
        forward_ms = best_time(lambda: gpt(tokens), repeat=3)
    return {
        "model": name,
        "param_tensors": sum(1 for _ in gpt.parameters()),
        "hook_us": hook_us,
        "hook_uncached_us": uncached_us,
        "forward_ms": forward_ms,
        "hook / forward": hook_us * 1e-3 / forward_ms,
        "state_dict_ms": best_time(gpt.state_dict),
        "plain_state_dict_ms": best_time(plain.state_dict),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pythia-14m", "pythia-160m"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name) for name in args.models]
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json('sampler', rows, models=args.models)}")


if __name__ == "__main__":
    main()
