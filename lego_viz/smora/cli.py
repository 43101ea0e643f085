"""CLI subcommands `smora-train` (the zoo experiment) and `smora-eval` (a saved SMoRA adapter on the zoo)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

# Tiny settings for a smoke run of the whole experiment.
QUICK = {"steps": 20, "router_steps": 10, "eval_n": 10}


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    """One option per `ExperimentConfig` field, plus --quick, --zoo, --out, --device, --threads."""
    from lego_viz.smora.assets import SMORA_DIR
    from lego_viz.smora.experiment import ExperimentConfig
    from lego_viz.zoo.model import ZOO_DIR

    defaults = ExperimentConfig()
    for field in fields(ExperimentConfig):
        value = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help="zoo folder (base + task adapters)")
    parser.add_argument("--out", type=Path, default=SMORA_DIR, help="output folder for the adapters and results")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument(
        "--composition-only",
        action="store_true",
        help="after a rebuild of the zoo adapters on the same base: rerun only the runs that use them, "
        "keeping the others from --out/results.json",
    )


def run_train(args: argparse.Namespace) -> int:
    """Run the experiment; write the adapters, results.json and RESULTS.md under --out; print the tables."""
    import torch

    from lego_viz.smora.assets import RESULTS_NAME
    from lego_viz.smora.experiment import ExperimentConfig, rerun_composition, run_experiment
    from lego_viz.smora.io import MAX_RESULTS_BYTES, read_json
    from lego_viz.smora.report import results_markdown

    torch.set_num_threads(args.threads)
    values = {field.name: getattr(args, field.name) for field in fields(ExperimentConfig)}
    config = ExperimentConfig(**{**values, **(QUICK if args.quick else {})})
    if args.composition_only:
        previous = args.out / RESULTS_NAME
        if not previous.is_file():
            raise FileNotFoundError(f"--composition-only needs earlier results at {previous}; run without it first")
        results = rerun_composition(read_json(previous, MAX_RESULTS_BYTES), config, args.zoo, args.out, args.device)
    else:
        results = run_experiment(config, zoo_dir=args.zoo, out_dir=args.out, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS_NAME).write_text(json.dumps(results, indent=1) + "\n")
    markdown = results_markdown(results)
    (args.out / "RESULTS.md").write_text(markdown)
    print(markdown)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Accuracy per zoo task and held-out load balance of a saved SMoRA adapter, as JSON."""
    from lego_viz.smora.experiment import eval_load_balance
    from lego_viz.smora.io import load_smora, read_smora_config
    from lego_viz.zoo.evaluate import evaluate, with_mean
    from lego_viz.zoo.model import load_base
    from lego_viz.zoo.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zoo task(s) {unknown}; known: {', '.join(TASKS)}")
    if not 1 <= args.n <= 500:
        raise ValueError(f"--n must be in [1, 500], got {args.n}")
    read_smora_config(args.adapter)  # a wrong folder fails before the base model loads
    model, tokenizer = load_base(device=args.device, zoo_dir=args.zoo)
    config = load_smora(model, args.adapter)
    result = {
        "adapter": str(args.adapter),
        "r": config.r,
        "k": config.k,
        "accuracy": with_mean(evaluate(model.eval(), tokenizer, tasks, n=args.n)),
        "load_balance_eval": eval_load_balance(model, tokenizer, tasks),
    }
    print(json.dumps(result, indent=2))
    return 0


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the options of `smora-train` or `smora-eval` to its `python -m lego_viz` subparser."""
    from lego_viz.zoo.model import ZOO_DIR

    if name == "smora-train":
        add_experiment_args(parser)
        parser.set_defaults(func=run_train)
        return
    parser.add_argument("adapter", type=Path, help="SMoRA folder (smora_config.json + smora_model.safetensors)")
    parser.add_argument("--tasks", default=None, help="comma-separated zoo tasks (default: all)")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per task (default 100)")
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help="zoo folder holding the base model")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.set_defaults(func=run_eval)
