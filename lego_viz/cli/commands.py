"""Command line: ``python -m lego_viz {inspect,check,merge,...}``.

Bad input exits with code 2 and one line on stderr (no traceback). Start-up stays light: this module
imports nothing heavy at the top, and subcommands that live elsewhere are listed in
:data:`PLUGIN_COMMANDS` by name and help line, so their module (and what it pulls in: transformers,
peft, ...) is imported only when that command runs. To add one, put ``"name": ("module", "help")``
there and give the module a ``configure(name, parser)`` that adds the options and
``parser.set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lego_viz.adapters import LoraAdapter
    from lego_viz.merge.first_pass import SharedFirstPass
    from lego_viz.merge.stream import StreamedMerge

# Subcommands of other packages: name → (module with ``configure(name, parser)``, help line).
PLUGIN_COMMANDS = {
    "zoo-eval": ("lego_viz.zoo.cli", "per-task exact-match accuracy of the demo zoo base, a task adapter or a merged adapter"),
    "smora-train": ("lego_viz.smora.cli", "train the zoo SMoRA adapters and baselines; write results + tables"),
    "smora-eval": ("lego_viz.smora.cli", "zoo accuracy and load balance of a saved SMoRA adapter"),
    "advise": ("lego_viz.cli.advise",
               "which k: reconstruction error vs rank per module (svd, lego), the knee, and ranks under a total budget"),
    "run": ("lego_viz.cli.run", "run base, each adapter and a merge on your text: log-likelihood and KL retention of each adapter"),
}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + exits 2; keep it to one line
        raise UsageError(f"{self.prog}: {message}")


def _cut(text: str) -> str:
    """A value quoted in a message, cut short (a 5,000-digit --k is named, not echoed)."""
    from lego_viz.adapters.types import shown  # on error paths only: --help imports nothing of the core

    return shown(text)


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,0.5; got {_cut(text)}") from None


# One NAME=INT of a per-module --k; a comma ends it only after the number, so a pattern's own commas
# and equals signs (``layers\.(1|2){1,2}\.q_proj=8``, ``(?=q)q_proj=2``) stay in the name.
_K_PART = re.compile(r"[\s,]*([^,\s].*?)\s*=\s*(\d+)\s*(?:,|$)")


def _k_value(text: str) -> int | dict[str, int]:
    """``8`` or ``q_proj=8,v_proj=4,*=6`` (per-module ranks; names may be patterns with commas)."""
    try:
        if "=" not in text:
            return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or NAME=INT,... ; got {_cut(text)}") from None
    ranks, pos = {}, 0
    while text[pos:].strip(" ,"):
        match = _K_PART.match(text, pos)
        if match is None:
            raise argparse.ArgumentTypeError(f"expected an integer or NAME=INT,... ; got {_cut(text)}")
        ranks[match.group(1)] = int(match.group(2))
        pos = match.end()
    return ranks


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` of a method option; the value typed as a number or true/false where it reads as one."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like merge=ties; got {_cut(text)}")
    value: object = raw.strip()
    if value in ("true", "false"):
        value = value == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return name.strip(), value


def _load(specs: Sequence[str], **options) -> list[LoraAdapter]:
    """Adapters validated from their files and left there (safetensors): read when a module is used.

    ``options`` as in :func:`lego_viz.adapters.load_adapter` (``defer_checks``, ``hash_weights``).
    """
    from lego_viz.adapters import load_adapters

    if not specs:
        raise UsageError("give at least one adapter (a PEFT folder, a .zip of one, or a hub id).")
    return load_adapters(specs, lazy=True, **options)


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    adapters = _load(args.adapters, hash_weights=False)  # it shows no hashes
    rows = [a.summary() for a in adapters]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for adapter, row in zip(adapters, rows):
        print(f"{row['name']}  ({row['source']})")
        print(f"  base      {row['base_model']}")
        print(f"  r         {row['r']}   lora_alpha {row['lora_alpha']}   scale {row['scale']}"
              f"{'   (rslora)' if row['use_rslora'] else ''}{'   fan_in_fan_out' if row['fan_in_fan_out'] else ''}")
        print(f"  targets   {', '.join(row['targets'])}  ({row['modules']} modules)")
        print(f"  MSUs      {row['msus']}")
        for warning in adapter.warnings:
            print(f"  note      {warning}")
    return 0


# --------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from lego_viz.adapters import check_compatible
    from lego_viz.checks.invariance import check_concat_sum, check_permutation

    adapters = _load(args.adapters)
    warnings = check_compatible(adapters, allow_base_mismatch=args.allow_base_mismatch) if len(adapters) > 1 else []
    results = {
        "permutation": check_permutation(adapters, seed=args.seed, tolerance=args.tolerance),
        "concat_sum": check_concat_sum(adapters, weights=args.weights, tolerance=args.tolerance),
    }
    if args.json:
        payload = {key: r.to_dict(per_module=args.per_module) for key, r in results.items()}
        payload["warnings"] = warnings
        print(json.dumps(payload, indent=2))
    else:
        for key, r in results.items():
            badge = "PASS" if r.passed else "FAIL"
            print(f"{badge}  {key:<12} max rel. error {r.max_rel_error:.2e}  mean {r.mean_rel_error:.2e}  "
                  f"(tolerance {r.tolerance:.0e}, {len(r.per_module)} modules, probe {r.probe_max_rel_error:.2e}, {r.seconds:.2f} s)")
        for warning in warnings:
            print(f"note  {warning}")
    return 0 if all(r.passed for r in results.values()) else 1


# --------------------------------------------------------------------------- merge


def _recipe_settings(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The merge flags a recipe fixes, with what the command line gave (None / False: not given)."""
    names = ("method", "k", "weights", "features", "param_reweight", "no_output_reweight", "preset", "seed", "n_init",
             "density", "option", "allow_base_mismatch")
    return [("--" + name.replace("_", "-"), getattr(args, name)) for name in names]


class _ProgressBar:
    """A tqdm bar on stderr (modules done / total) that shows up only once a merge has run ~2 s."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="module", desc="merge", delay=2.0, file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _leave_cores_for_helpers(helpers: int = 2) -> None:
    """Give torch the cores this process may use less ``helpers`` (at least one).

    Where torch is not imported (the lego route runs on numpy alone), the limit goes to
    ``OMP_NUM_THREADS`` for a later step that imports it; numpy's BLAS, loaded already, keeps its own.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - helpers)))
        return
    given = os.environ.get("OMP_NUM_THREADS", "")
    limit = max(1, cores - helpers)
    os.environ["OMP_NUM_THREADS"] = str(min(int(given), limit) if given.isdigit() and int(given) > 0 else limit)


@dataclasses.dataclass
class _MergeRequest:
    """A merge as the command line or a config asks for it, before anything is merged."""

    adapters: list[LoraAdapter]
    method: str
    k: int | dict[str, int] | None
    weights: list[float] | None
    allow_base_mismatch: bool
    options: dict
    dtype: str | None
    max_rank: int | None
    first_pass: SharedFirstPass | None = None  # lego's first pass, started in a forked process


def _first_pass(adapters: list[LoraAdapter], method: str) -> SharedFirstPass | None:
    """lego's first pass over the weights (numpy only), started in a forked process now; this one joins
    in once it has set up the merge."""
    if method != "lego":
        return None
    from lego_viz.merge.first_pass import SharedFirstPass

    return SharedFirstPass.start(adapters)


def _request_from_config(args: argparse.Namespace) -> _MergeRequest:
    """``--config`` / ``--recipe``: every merge setting comes from the file."""
    from lego_viz.export.recipe import load_config, load_models

    flag, what = ("--config", "config") if args.config else ("--recipe", "recipe")
    if args.config and args.recipe:
        raise UsageError("give --config or --recipe, not both (a recipe is a config).")
    if args.adapters:
        raise UsageError(f"give either adapters or {flag}, not both.")
    given = [option for option, value in _recipe_settings(args) if value not in (None, False)]
    if given:
        raise UsageError(f"{flag} takes the merge settings from the {what}; drop {', '.join(given)} "
                         f"(or edit the {what}).")
    config = load_config(args.config or args.recipe, what)
    adapters, notes = load_models(config, lazy=True)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return _MergeRequest(adapters, config.method, config.k, config.weights, config.allow_base_mismatch,
                         dict(config.options), args.dtype or config.dtype, args.max_rank or config.max_rank,
                         _first_pass(adapters, config.method))


def _request_from_args(args: argparse.Namespace) -> _MergeRequest:
    """Adapters and settings from the command line."""
    from lego_viz.merge.registry import user_options

    # Values are checked as the merge reads each module and the hashes are made beside the merge
    # (lego_viz.merge.stream): each file is read once by the merge and once by the hash, not three times.
    adapters = _load(args.adapters, defer_checks=True, hash_weights=False)
    method = args.method or "lego"
    first_pass = _first_pass(adapters, method)
    options = {key: value for key in ("features", "param_reweight", "seed", "n_init", "density", "preset")
               if (value := getattr(args, key)) is not None}
    if args.no_output_reweight:
        options["output_reweight"] = False
    # merge_streaming's own arguments (checks, errors, group_bytes, ...) are no options of a method
    options.update(user_options(method, dict(args.option or []), "--option"))
    return _MergeRequest(adapters, method, args.k, args.weights, args.allow_base_mismatch, options, args.dtype,
                         args.max_rank, first_pass)


def _run_merge(request: _MergeRequest, checks: bool) -> StreamedMerge:
    """The merge, its checks and the report's scores, module group by group (lego_viz.merge.stream): memory
    stays at one group, and the checks and scores use the factors the merge just read."""
    from lego_viz.merge.stream import merge_streaming

    summaries = None
    if request.first_pass is not None:
        summaries = request.first_pass.result()
        # From here on a reader thread and the input hashes each keep a core busy beside the merge: torch's
        # own threads on those cores, where a step needs torch, would only contend (2 cores, 8 adapters of
        # the reference shape: 7.5 s with torch's default 2 threads, 5.5 s with one).
        _leave_cores_for_helpers()
    progress = _ProgressBar()
    try:
        return merge_streaming(request.adapters, method=request.method, k=request.k, weights=request.weights,
                               allow_base_mismatch=request.allow_base_mismatch, checks=checks, progress=progress,
                               summaries=summaries, arrays=True, **request.options)
    finally:
        progress.close()


def cmd_merge(args: argparse.Namespace) -> int:
    request = _request_from_config(args) if args.config or args.recipe else _request_from_args(args)
    from lego_viz.export.folder import export_adapter  # imported while the forked first pass works

    result = _run_merge(request, checks=not args.no_checks)
    merged = result.merged
    checks = {key: r.to_dict(per_module=False) for key, r in result.checks.items()} or None
    out = export_adapter(merged, args.out, force=args.force, checks=checks, errors=result.errors,
                         retained=result.retained, dtype=request.dtype, max_rank=request.max_rank)
    ranks = sorted(set(merged.ranks.values()))
    print(f"merged {len(request.adapters)} adapters with {request.method} → rank {ranks[0] if len(ranks) == 1 else ranks} "
          f"over {len(merged.modules)} modules in {merged.timings['total']:.2f} s → {out}")
    for warning in dict.fromkeys(merged.warnings):
        print(f"note: {warning}")
    if args.push_to_hub:
        from lego_viz.export.serving import push_to_hub

        print(f"pushed to {push_to_hub(out, args.push_to_hub)}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line.

    Args:
        only: a subcommand name: fill in only that plugin command's options (the others keep their
            help line), so running one command imports only its own module. None fills in all.
    """
    parser = _Parser(prog="python -m lego_viz", allow_abbrev=False, description="See, check and merge LoRA adapters unit by unit (LoRA-LEGO).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", allow_abbrev=False, help="per adapter: base, r, alpha, scale, targets, number of MSUs")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT folder, .zip of one, or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", allow_abbrev=False, help="permutation and concatenation–summation checks (weight space)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--per-module", action="store_true", help="with --json: include every module's error")
    p.add_argument("--weights", type=float_list, default=None, help="comma-separated weights for concat-sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-5, help="pass threshold on relative error (default 1e-5)")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("merge", allow_abbrev=False, help="merge adapters and export a PEFT folder + report + recipe")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER")
    p.add_argument("--config", help="merge as a mergekit-style YAML says (models, merge_method, parameters, dtype)")
    p.add_argument("--recipe", help="re-run the merge described by a recipe.yaml (a config of the same form)")
    p.add_argument("--method", default=None, help="lego (default), linear, svd, core_space, knots, peft_linear, ties, dare_linear")
    p.add_argument("--k", type=_k_value, default=None, help="target rank, or per module: q_proj=8,v_proj=4,*=6")
    p.add_argument("--weights", type=float_list, default=None, help="comma-separated, one per adapter")
    p.add_argument("--features", default=None, help="raw, canonical (default) or normalized")
    p.add_argument("--param-reweight", default=None, help="none, l2 (default) or linf")
    p.add_argument("--no-output-reweight", action="store_true")
    p.add_argument("--preset", default=None, help="lego preset: paper")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-init", type=int, default=None)
    p.add_argument("--density", type=float, default=None, help="ties / dare_linear / knots / core_space density")
    p.add_argument("--option", type=_option, action="append", default=None, metavar="NAME=VALUE",
                   help="any other method option, repeatable: merge=ties (core_space), rule=dare_ties (knots), rescale=lsq (lego)")
    p.add_argument("--allow-base-mismatch", action="store_true", help="merge adapters whose base names differ (same shapes)")
    p.add_argument("--no-checks", action="store_true", help="skip the invariance checks written to the report")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out (never other files, never an input)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="saved weights (default: the inputs')")
    p.add_argument("--max-rank", type=int, default=None, help="refuse a merge with any module above this rank")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the export (with its model card)")
    p.set_defaults(func=cmd_merge)

    for name, (module_name, help_line) in PLUGIN_COMMANDS.items():
        p = sub.add_parser(name, allow_abbrev=False, help=help_line)
        if only is None or only == name:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if not (exc.name and module_name.startswith(exc.name)):
                    raise
                if only is None:  # listing everything: a trimmed install simply lacks the command
                    sub.choices.pop(name)
                    continue
                raise UsageError(f"{name}: not part of this install ({module_name} is missing).") from None
            module.configure(name, p)
    return parser


# argparse reads "--weights -1,0.5" as two options (only a lone "-1" looks like a number to it);
# a value that starts with a minus and a digit is glued to its option instead.
_NUMBER_LIST_OPTIONS = ("--weights",)
_NEGATIVE_LIST = re.compile(r"^-\.?\d")


def _glue_negative_lists(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _NUMBER_LIST_OPTIONS and _NEGATIVE_LIST.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _glue_negative_lists(sys.argv[1:] if argv is None else argv)
    # The first word that is not an option names the command (the top level has no valued options).
    command = next((word for word in argv if not word.startswith("-")), "")
    try:
        args = build_parser(only=command).parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, KeyError, OSError) as exc:  # AdapterError is a ValueError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


_COMMAND_PID = os.getpid()


def _interrupt(signum, frame) -> None:
    # A process the command forked (lego's first pass) inherits this handler, and multiprocessing ends it
    # with SIGTERM whenever the command exits early: it leaves at once and quietly, as by default, and
    # only the command itself unwinds (and prints no child's traceback).
    if os.getpid() != _COMMAND_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def run() -> None:
    """The console entry point: :func:`main`, then a quick exit where the command loaded torch.

    Python's own shutdown with torch loaded takes about a second (it tears down every module
    object, and torch has very many); the command has closed everything it wrote by then. So the
    output is flushed, the exit handlers run (temporary directories, thread pools) and the process
    leaves without the teardown. SIGTERM and SIGHUP end the command as Ctrl-C does, so what it
    was writing and the zips it extracted are removed on the way out.
    """
    import faulthandler
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)
    # A last line: inputs are read, never mapped, but transformers maps a base model's weights for
    # `run`; a file truncated under that map is a bus error, which then at least says where it was.
    faulthandler.enable()
    code = main()
    if "torch" in sys.modules:
        import atexit
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)
    raise SystemExit(code)
