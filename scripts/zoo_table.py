"""Measure the zoo merge-quality table and store it in assets/zoo/zoo_card.json.

    python scripts/zoo_table.py            # base, each adapter, linear, svd k=8, lego k=8 on every task

Prints the table as markdown (for the README) and writes it under "merge_table" in the card; then
prints the card's targets, retention by number of adapters and family merges (measured by the build).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lego_viz.zoo.build import read_card, write_card
from lego_viz.zoo.model import ZOO_DIR
from lego_viz.zoo.table import merge_table, table_markdown, targets_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help=f"zoo folder (default {ZOO_DIR})")
    parser.add_argument("--n", type=int, default=None, help="held-out prompts per task (default: the card's eval n)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave zoo_card.json as it is")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    card = read_card(args.zoo)
    n = args.n or card["evaluation"]["n_per_task"]
    started = time.perf_counter()
    table = merge_table(args.zoo, n=n, device="cpu", on_row=lambda label: print(f"  done: {label}", file=sys.stderr))
    table["seconds"] = round(time.perf_counter() - started, 1)
    markdown = table_markdown(table)
    if not args.no_write:
        card["merge_table"] = table
        write_card(args.zoo, card)
    print(markdown)
    if "targets" in card:
        print(targets_markdown(card))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
