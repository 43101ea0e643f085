"""Train the zoo's SMoRA models and write `assets/zoo/smora/` (two adapters, results.json, RESULTS.md).

Runs, all seeded and on the mixture of zoo tasks: a multi-task SMoRA adapter with and without loss-free
balancing, dense LoRAs of rank r and rank k, and a router over the frozen merged MSUs of the zoo task
adapters next to the static merges of the same units. Deterministic on CPU for a fixed thread count.
Same as `python -m lego_viz smora-train`.

    python scripts/train_smora.py                              # the shipped results
    python scripts/train_smora.py --quick --out /tmp/smora     # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lego_viz.smora.cli import add_experiment_args, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_args(parser)
    raise SystemExit(run_train(parser.parse_args()))
