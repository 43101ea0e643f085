"""CLI subcommand `advise`: which k — error against rank per module, the knee, ranks under a budget."""

from __future__ import annotations

import argparse
import json


def run_advise(args: argparse.Namespace) -> int:
    """Print the advice (or JSON); with ``--out``, also write the merge at the allocated ranks."""
    from lego_viz.adapters import load_adapters
    from lego_viz.merge.advise import advise, k_patterns

    if not args.adapters:
        raise ValueError("give at least one adapter (a PEFT folder, a .zip of one, or a hub id).")
    adapters = load_adapters(args.adapters)
    advice = advise(adapters, weights=args.weights, budget=args.budget, max_rank=args.max_rank, lego=not args.no_lego,
                    allow_base_mismatch=args.allow_base_mismatch)
    out = None
    if args.out:
        from lego_viz.export.folder import export_adapter
        from lego_viz.merge import merge

        merged = merge(adapters, args.method, k=k_patterns(advice.allocation), weights=args.weights,
                       allow_base_mismatch=args.allow_base_mismatch)
        out = export_adapter(merged, args.out, force=args.force, adapters=adapters, advice=advice.summary())
    if args.json:
        payload = advice.to_dict()
        if out is not None:
            payload["out"] = str(out)
        print(json.dumps(payload, indent=2))
        return 0
    n_modules = len(advice.curves)
    print(f"{len(adapters)} adapters, {n_modules} modules; relative error ‖ΔW_k − Σ w·ΔW‖ / ‖Σ w·ΔW‖, mean over modules")
    for method in advice.knee:
        ks, errors = advice.mean_curve(method)
        shown = "  ".join(f"k={k}: {e:.3f}" for k, e in zip(ks, errors) if k in (1, 2, 4, 8, 16, 32, 64, ks[-1]))
        print(f"  {method:<5} {shown}")
    print("suggested k (knee of the mean curve): " + ", ".join(f"{m} {k}" for m, k in advice.knee.items()))
    print(f"budget {advice.budget} ranks over {n_modules} modules: uniform k={advice.uniform_k} → mean error "
          f"{advice.uniform_error:.3f}; per-module allocation → {advice.allocated_error:.3f} (svd curve)")
    counts: dict[int, int] = {}
    for k in advice.allocation.values():
        counts[k] = counts.get(k, 0) + 1
    print("  allocated ranks: " + ", ".join(f"k={k} × {c} modules" for k, c in sorted(counts.items())))
    if out is not None:
        print(f"wrote the {args.method} merge at the allocated ranks (rank_pattern / alpha_pattern) → {out}")
    else:
        print("merge with these ranks: add --out DIR (or `--json` for the per-module k mapping)")
    return 0


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the options of `advise` to its `python -m lego_viz` subparser (help line: lego_viz.cli.commands.PLUGIN_COMMANDS)."""
    from lego_viz.cli.commands import float_list

    parser.add_argument("adapters", nargs="+", metavar="ADAPTER")
    parser.add_argument("--budget", type=int, default=None, help="total ranks over all modules (default: modules × the svd knee)")
    parser.add_argument("--max-rank", type=int, default=None, help="largest k per module (default: 2 × the largest source rank)")
    parser.add_argument("--weights", type=float_list, default=None, help="comma-separated, one per adapter")
    parser.add_argument("--no-lego", action="store_true", help="skip the lego curve (one merge per k); the svd curve is nearly free")
    parser.add_argument("--out", default=None, help="also write a merge at the allocated per-module ranks to this folder")
    parser.add_argument("--method", default="svd", help="merge method for --out (default svd, the curve the allocation follows)")
    parser.add_argument("--force", action="store_true", help="with --out: replace an earlier export there")
    parser.add_argument("--allow-base-mismatch", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the curves, knees and allocation as JSON")
    parser.set_defaults(func=run_advise)
