"""Write a merged adapter as a PEFT folder, with ``merge_report.json``, ``recipe.yaml`` and a model card (ARCHITECTURE §7).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place at the
end, so an interrupted export leaves neither a half-written adapter nor stray temp files. A merge whose
factors are numpy arrays exports without importing torch (:mod:`lego_viz.adapters.safetensors_io`), to the same bytes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from lego_viz.adapters import CONFIG_NAME, KEY_PREFIX, AdapterError, LoraAdapter, printable, safetensors_io
from lego_viz.export.model_card import CARD_NAME, model_card
from lego_viz.export.recipe import recipe_config
from lego_viz.export.serving import cast_factor, check_max_rank, resolve_dtype

if TYPE_CHECKING:
    from lego_viz.merge import MergedAdapter

REPORT_NAME = "merge_report.json"
RECIPE_NAME = "recipe.yaml"
WEIGHTS_NAME = "adapter_model.safetensors"


class ExportError(AdapterError):
    """The export cannot be written where asked; the message says what to do."""


# Task types whose PEFT wrapper expects trained heads (modules_to_save); a merge leaves heads out, so
# exporting them would make PEFT look for head weights that are not there.
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def export_task_type(merged: MergedAdapter) -> str | None:
    task = merged.template_config.get("task_type")
    return None if task in _HEAD_TASKS else task


def peft_config(merged: MergedAdapter) -> dict:
    """An ``adapter_config.json`` for the merge: scale 1 (``lora_alpha = r``), exact module names."""
    ranks = merged.ranks
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {name: r for name, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": export_task_type(merged),
        "base_model_name_or_path": merged.base_model,
        "r": common,
        "lora_alpha": common,
        # Units are folded, so every module has scale 1: alpha = r, also where the rank differs.
        "rank_pattern": odd,
        "alpha_pattern": dict(odd),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(merged.template_config.get("fan_in_fan_out", False)),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lego-viz", "torch", "peft", "transformers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["lego-viz"] = __import__("lego_viz").__version__
    return versions


def reconstruction_errors(merged: MergedAdapter, adapters: list[LoraAdapter]) -> dict[str, float]:
    """Per module, ``‖ΔW_merged − Σ w_t ΔW_t‖ / ‖Σ w_t ΔW_t‖`` from factors (no dense matrix).

    Exact (float32 products, float64 sums); ``‖Σ w_t ΔW_t‖²`` comes from the merge where it had it.
    """
    from lego_viz.checks.retention import report_scores

    return report_scores(merged.modules, adapters, merged.weights, merged.reference_sq_norms,
                         merged.report_products)[0]


def build_report(
    merged: MergedAdapter, adapters: list[LoraAdapter] | None = None, checks: dict | None = None, advice: dict | None = None,
    errors: dict[str, float] | None = None, retained: dict | None = None,
) -> dict:
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": merged.method,
        "options": merged.options,
        "seed": merged.options.get("seed"),
        "weights": merged.weights,
        "inputs": merged.sources,
        "base_model": merged.base_model,
        "ranks": merged.ranks,
        "cluster_sizes": merged.cluster_sizes(),
        "timings_s": merged.timings,
        "details": merged.details,
        "warnings": merged.warnings,
        "versions": _versions(),
    }
    task = merged.template_config.get("task_type")
    if task in _HEAD_TASKS:
        report["warnings"] = [*report["warnings"], f"task_type {task} exported as null: its classification head is "
                              "task-specific and not part of the merge; load the adapter on a base with the head you want."]
    if adapters is not None and (errors is None or retained is None):
        # ⟨ΔW_merge, w_t ΔW_t⟩ / ‖w_t ΔW_t‖² per source adapter (how much of each the merge keeps) and
        # the errors share their products
        from lego_viz.checks.retention import report_scores

        found_errors, found_retained = report_scores(merged.modules, adapters, merged.weights, merged.reference_sq_norms,
                         merged.report_products)
        errors = found_errors if errors is None else errors
        retained = found_retained if retained is None else retained
    if errors:
        report["relative_error_vs_weighted_sum"] = {
            "max": max(errors.values()), "mean": sum(errors.values()) / len(errors), "per_module": errors,
        }
    if retained is not None:
        report["retention"] = retained
    if checks:
        report["invariance"] = checks
    if advice:
        report["advice"] = advice  # which k: suggested ranks and the budget allocation (lego_viz.merge.advise)
    return report


def _portable(source: str) -> str:
    """Local sources as absolute paths (the recipe may run from elsewhere); hub ids as they are."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def recipe(merged: MergedAdapter, dtype: str = "float32") -> dict:
    """What ``python -m lego_viz merge --config`` needs to redo this merge: a mergekit-style config."""
    sources = [{"path": _portable(s["source"]), "name": s["name"], "sha256": s["sha256"],
                "config_sha256": s.get("config_sha256", "")} for s in merged.sources]
    return recipe_config(merged, sources, dtype)


def _write_weights(path: Path, merged: MergedAdapter, dtype: str) -> None:
    factors = {f"{KEY_PREFIX}{name}.lora_{side}.weight": factor
               for name, lora in merged.modules.items() for side, factor in (("A", lora.A), ("B", lora.B))}
    if all(isinstance(factor, np.ndarray) for factor in factors.values()):
        tensors = {key: cast_factor(factor, dtype, key) for key, factor in factors.items()}
        safetensors_io.save_file(tensors, path, dtype, metadata={"format": "pt"})
        return
    import torch
    from safetensors.torch import save_file

    # tensors, or a mix: arrays join the tensors (as_tensor leaves a tensor as it is)
    tensors = {key: cast_factor(torch.as_tensor(factor), dtype, key) for key, factor in factors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write(folder: Path, merged: MergedAdapter, report: dict, dtype: str) -> None:
    _write_weights(folder / WEIGHTS_NAME, merged, dtype)
    config = peft_config(merged)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    steps = recipe(merged, dtype)
    (folder / RECIPE_NAME).write_text(yaml.safe_dump(steps, sort_keys=False), encoding="utf-8")
    (folder / CARD_NAME).write_text(model_card(merged, steps, dtype, config["task_type"]), encoding="utf-8")


EXPORT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, REPORT_NAME, RECIPE_NAME, CARD_NAME})


def _check_target(out: Path, merged: MergedAdapter, force: bool) -> None:
    """Refuse an output folder that is, holds or lies inside an input, and (with ``force``) one that an
    export did not write: ``--force`` replaces a previous export, never the user's other files."""
    for source in merged.sources:
        spec = source.get("source") or ""
        if not spec or spec.startswith("memory:") or not Path(spec).expanduser().exists():
            continue  # a hub id or an adapter built in memory
        src = Path(spec).expanduser().resolve()
        relation = "is" if out == src else "is inside" if src in out.parents else "holds" if out in src.parents else ""
        if relation:
            raise ExportError(f"the output folder {out} {relation} input adapter {source.get('name')!r} ({src}); "
                              "write the merge to a folder apart from its inputs.")
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    if not entries:
        return
    if not force:
        raise ExportError(f"{out} is not empty; choose an empty folder or pass --force to replace an earlier export.")
    foreign = sorted(e.name for e in entries if e.name not in EXPORT_FILES or e.is_symlink() or not e.is_file())
    if foreign or not {CONFIG_NAME, REPORT_NAME} <= {e.name for e in entries}:
        shown = ", ".join(printable(name)[:40] for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        what = f"it holds {shown}" if foreign else f"it has no {REPORT_NAME}"
        raise ExportError(f"{out} is not a folder an export wrote ({what}); --force replaces only an earlier export "
                          f"({CONFIG_NAME} + {REPORT_NAME} and the files beside them): choose another folder.")


def export_adapter(
    merged: MergedAdapter,
    out_dir: str | os.PathLike,
    force: bool = False,
    adapters: list[LoraAdapter] | None = None,
    checks: dict | None = None,
    dtype: str | None = None,
    max_rank: int | None = None,
    advice: dict | None = None,
    errors: dict[str, float] | None = None,
    retained: dict | None = None,
) -> Path:
    """Write ``merged`` as a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

    Args:
        merged: the merge result.
        out_dir: target folder; must not exist or be empty unless ``force``, and is never an input's
            folder (nor holds one, nor lies inside one).
        force: replace a folder that an earlier export wrote (nothing else).
        adapters: the source adapters, to put reconstruction errors in the report.
        checks: invariance results to put in the report.
        dtype: ``fp32``/``bf16``/``fp16`` for the saved factors; default the inputs' dtype.
        max_rank: refuse the export if any module's rank exceeds it (serving stacks cap LoRA rank).
        advice: the "which k?" suggestion (:meth:`lego_viz.merge.advise.Advice.summary`) to put in the report.
        errors, retained: per-module reconstruction errors and per-adapter retention already computed
            (by a streamed merge, :mod:`lego_viz.merge.stream`) instead of recomputing them from ``adapters``.

    Returns:
        The folder written.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out.")
    _check_target(out, merged, force)
    check_max_rank(merged, max_rank)
    saved_dtype = resolve_dtype(dtype, [s.get("dtype", "float32") for s in merged.sources])
    out.parent.mkdir(parents=True, exist_ok=True)
    report = build_report(merged, adapters, checks, advice, errors, retained)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, merged, report, saved_dtype)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def zip_export(folder: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Zip an exported folder (flat: the PEFT files at the zip's top level inside one folder)."""
    folder, zip_path = Path(folder), Path(zip_path)
    base = shutil.make_archive(str(zip_path.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name)
    return Path(base)
