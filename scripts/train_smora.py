"""Train the zoo's SMoRA models and write `assets/zoo/smora/` (two adapters, results.json, RESULTS.md).

Runs, all seeded and on the mixture of zoo tasks: a multi-task SMoRA adapter with and without loss-free
balancing, dense LoRAs of rank r and rank k, and a router over the frozen merged MSUs of the zoo task
adapters next to the static merges of the same units. Deterministic on CPU for a fixed thread count.

    python scripts/train_smora.py                 # the shipped results (a few minutes on 2 CPU cores)
    python scripts/train_smora.py --quick --out /tmp/smora   # a smoke run
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from lego_viz.smora.assets import RESULTS_NAME, SMORA_DIR
from lego_viz.smora.experiment import ExperimentConfig, run_experiment
from lego_viz.smora.report import results_markdown
from lego_viz.zoo.model import ZOO_DIR

QUICK = {"steps": 20, "router_steps": 10, "eval_n": 10}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ExperimentConfig()
    for field in fields(ExperimentConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help="zoo folder (base + adapters)")
    parser.add_argument("--out", type=Path, default=SMORA_DIR, help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine; results may depend on it)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    values = {field.name: getattr(args, field.name) for field in fields(ExperimentConfig)}
    config = ExperimentConfig(**{**values, **(QUICK if args.quick else {})})
    results = run_experiment(config, zoo_dir=args.zoo, out_dir=args.out, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS_NAME).write_text(json.dumps(results, indent=1) + "\n")
    markdown = results_markdown(results)
    (args.out / "RESULTS.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
