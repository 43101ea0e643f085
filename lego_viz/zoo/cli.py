"""CLI subcommand `zoo-eval`: exact-match accuracy per zoo task of the base, an adapter or a merge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _task_list(text: str) -> list[str]:
    from lego_viz.zoo.tasks import TASKS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown zoo task(s) {unknown or [text]}; known: {', '.join(TASKS)}")
    return names


def run_eval(args: argparse.Namespace) -> int:
    """Load the base (plus `--adapter`/`--merged`), evaluate, print a table or JSON."""
    import torch

    from lego_viz.zoo.evaluate import evaluate, with_mean
    from lego_viz.zoo.model import load_adapted, load_base
    from lego_viz.zoo.tasks import N_HELD_OUT, TASKS

    if not 1 <= args.n <= N_HELD_OUT:
        raise ValueError(f"--n must be in [1, {N_HELD_OUT}] (the held-out set size), got {args.n}")
    torch.set_num_threads(args.threads)
    adapter = args.adapter or args.merged
    if adapter is None:
        model, tokenizer = load_base(device=args.device, zoo_dir=args.zoo)
    else:
        model, tokenizer = load_adapted(adapter, device=args.device, zoo_dir=args.zoo)
    scores = with_mean(evaluate(model, tokenizer, args.tasks or list(TASKS), n=args.n))
    if args.json:
        print(json.dumps(scores, indent=2))
        return 0
    print(f"model: {adapter or 'base'}   (exact match, greedy, {args.n} held-out prompts per task)")
    for name, accuracy in scores.items():
        print(f"  {name:<10} {accuracy:7.1%}")
    return 0


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the options of `zoo-eval` (the only command here) to its `python -m lego_viz` subparser."""
    from lego_viz.zoo.evaluate import DEFAULT_EVAL_N
    from lego_viz.zoo.model import ZOO_DIR

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder for the zoo base")
    which.add_argument("--merged", type=Path, default=None, help="a merged adapter folder written by `merge`/export")
    parser.add_argument("--json", action="store_true", help='print {"task": accuracy, ..., "mean": ...}')
    parser.add_argument("--tasks", type=_task_list, default=None, help="comma-separated tasks (default: all)")
    parser.add_argument("--n", type=int, default=DEFAULT_EVAL_N, help=f"held-out prompts per task (default {DEFAULT_EVAL_N})")
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help="zoo folder holding the base model")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.set_defaults(func=run_eval)
