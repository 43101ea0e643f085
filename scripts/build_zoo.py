"""Build the demo zoo: pre-train the tiny base, train one LoRA per task, write assets/zoo/.

    python scripts/build_zoo.py --threads 2  # the shipped zoo (CPU, seeded; the same bits for the same thread count)
    python scripts/build_zoo.py --smoke      # a few steps into a temporary folder (CI)
    python scripts/build_zoo.py --reuse-base assets/zoo/base   # only the adapters, on the built base

Then run `python scripts/zoo_table.py` to add the merge-quality table to zoo_card.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from lego_viz.zoo.build import BuildConfig, build_zoo
from lego_viz.zoo.model import ZOO_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {ZOO_DIR}; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything, never into the shipped assets")
    # One thread: on a busy 2-core machine two threads per process oversubscribe the cores and run several
    # times slower; the thread count is recorded in the card.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--reuse-base",
        type=Path,
        default=None,
        help="a base folder from an earlier full build of the same recipe: rebuild only the adapters",
    )
    args = parser.parse_args(argv)

    if args.smoke and args.out is not None and args.out.resolve() == ZOO_DIR.resolve():
        parser.error("--smoke never writes into the shipped assets; give another --out or none")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    config = BuildConfig.smoke() if args.smoke else BuildConfig()
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="zoo_smoke_")) if args.smoke else ZOO_DIR)

    # One tick per optimiser step, plus one per evaluation (the base and each adapter).
    steps = config.total_steps - (config.pretrain.steps if args.reuse_base else 0)
    with tqdm(total=steps + 1 + len(config.adapter_names), desc="zoo", unit="step") as bar:

        def tick(label: str) -> None:
            bar.set_description(label, refresh=False)
            bar.update()

        card = build_zoo(out_dir, config, on_step=tick, pretrained_base=args.reuse_base)

    print(f"wrote {out_dir} in {card['build']['wall_seconds']} s (cpu {card['build']['cpu_seconds']} s)")
    print("base:", {task: round(acc, 3) for task, acc in card["accuracy"]["base"].items()})
    print("adapters on their own task:", card["accuracy"]["adapters_own_task"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
