"""A merge that reads its inputs one group of modules at a time: bounded memory, one read per module.

The methods work module by module already, so a merge of adapters kept on disk
(``load_adapters(..., lazy=True)``) can run on consecutive groups of modules: read the group's
factors of every adapter (float32 from whatever was stored), merge them, run the invariance checks
and the report's reconstruction errors on the same tensors while they are in memory, then drop
them. Peak memory is about one group, not the input; each tensor is read once. The result is the
one :func:`lego_viz.merge.merge` gives on the same adapters in memory, bit for bit: methods treat
modules independently, and lego's batched k-means does not depend on which modules share a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lego_viz.adapters import LoraAdapter, hash_in_background, module_order
from lego_viz.invariance import EXACT_BUDGET, CheckResult, check_concat_sum, check_permutation, exact_cost
from lego_viz.merge import MergedAdapter, plan, wrap
from lego_viz.merge.base import MethodOutput

# float32 bytes of the factors read per group (all adapters' copies of the group's modules). A group
# costs about twice this at its peak (the merge's and the checks' per-module copies); 128 MiB keeps a
# 64-adapter merge of the reference shape near 0.6 GiB and still batches ~3 layers of k-means at 8.
GROUP_BYTES = 128 * 2**20
# Methods whose result depends on which modules run together: dare_linear draws every module's drop
# mask from one random stream, so it runs as one group.
_WHOLE_ONLY = {"dare_linear"}

Progress = Callable[[int, int], None]  # (modules done, modules in all)


@dataclass
class StreamedMerge:
    """What :func:`merge_streaming` returns."""

    merged: MergedAdapter
    checks: dict[str, CheckResult] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # per module, vs the weighted sum
    retained: dict[str, dict] = field(default_factory=dict)  # per adapter, as lego_viz.retention.retention


def module_groups(adapters: Sequence[LoraAdapter], budget: int = GROUP_BYTES) -> list[list[str]]:
    """Consecutive modules whose float32 factors, over all adapters, fit ``budget`` bytes (≥ 1 module each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in module_order(adapters):
        size = 4 * sum(m.r * (m.d_in + m.d_out) for a in adapters if (m := a.modules.get(name)) is not None)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _loaded(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> list[LoraAdapter]:
    """The adapters restricted to ``names``, factors in memory (read now if they were on disk)."""
    views = []
    for adapter in adapters:
        modules = {}
        for name in names:
            if (module := adapter.modules.get(name)) is not None:
                modules[name] = module.load() if hasattr(module, "load") else module
        views.append(LoraAdapter(name=adapter.name, source=adapter.source, config=adapter.config, modules=modules,
                                 sha256=adapter.sha256, weights_file=adapter.weights_file,
                                 config_sha256=adapter.config_sha256))
    return views


_malloc_trim = None  # glibc's malloc_trim, looked up on first use (False where there is none)


def _release_freed_memory() -> None:
    """Give memory freed by the last group back to the OS (glibc; elsewhere a no-op).

    glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a long run of
    groups whose tensors differ in size fragments it and the resident size creeps up group by group
    (2.1 GiB after 32 layers of 64 adapters where one group needs ~0.6 GiB). ``malloc_trim`` hands the
    free pages back.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _add_counts(total: dict, part: dict) -> None:
    """Add a group's details into the total: numbers add up, nested dicts recurse, the rest is kept."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total[key] = value


def _combine_checks(parts: list[CheckResult]) -> CheckResult:
    first = parts[0]
    combined = CheckResult(name=first.name, tolerance=first.tolerance, expect_pass=first.expect_pass, method=first.method)
    for part in parts:
        combined.per_module.update(part.per_module)
        combined.probe_max_rel_error = max(combined.probe_max_rel_error, part.probe_max_rel_error)
        combined.seconds += part.seconds
    return combined


def merge_streaming(
    adapters: Sequence[LoraAdapter],
    method: str = "lego",
    k: int | Mapping[str, int] | None = None,
    weights: Sequence[float] | None = None,
    allow_base_mismatch: bool = False,
    checks: bool = True,
    errors: bool = True,
    progress: Progress | None = None,
    group_bytes: int = GROUP_BYTES,
    **options,
) -> StreamedMerge:
    """:func:`lego_viz.merge.merge` plus the checks and report errors, one group of modules at a time.

    Args:
        adapters: adapters, typically loaded with ``lazy=True`` (in-memory ones work the same).
        method, k, weights, allow_base_mismatch, **options: as in :func:`lego_viz.merge.merge`.
        checks: run the permutation and concatenation–summation checks on every group.
        errors: compute each module's ‖ΔW_merged − Σ w_t ΔW_t‖ / ‖Σ w_t ΔW_t‖ and each adapter's
            retention (:mod:`lego_viz.retention`) for the report.
        progress: called with (modules done, modules in all) after each group.
        group_bytes: float32 bytes of input factors held at once.

    Returns:
        A :class:`StreamedMerge`: the merged adapter, the check results and the errors.
    """
    from lego_viz.retention import report_scores

    adapters = list(adapters)
    spec, resolved, warnings, weights, ranks = plan(adapters, method, k, weights, allow_base_mismatch, options)
    hashed = hash_in_background(adapters)  # the report's input hashes, on another core while the merge runs
    groups = [module_order(adapters)] if method in _WHOLE_ONLY else module_groups(adapters, group_bytes)
    # Exact or probe is decided once, for the whole input, as the in-memory checks decide it.
    exact = {key: exact_cost(adapters, concatenated=key == "concat_sum") <= EXACT_BUDGET for key in ("permutation", "concat_sum")}

    output = MethodOutput(modules={})
    found: dict[str, list[CheckResult]] = {"permutation": [], "concat_sum": []}
    result_errors: dict[str, float] = {}
    retained: dict[str, dict] = {a.name: {"per_module": {}} for a in adapters}
    elapsed, done, total = 0.0, 0, sum(len(g) for g in groups)
    for names in groups:
        block = _loaded(adapters, names)
        start = time.perf_counter()
        part = spec.fn(block, weights, ranks, resolved)
        elapsed += time.perf_counter() - start
        output.modules.update(part.modules)
        output.labels.update(part.labels)
        output.unit_owner.update(part.unit_owner)
        output.reference_sq_norms.update(part.reference_sq_norms)
        output.warnings += [w for w in part.warnings if w not in output.warnings]
        for key, value in part.timings.items():
            output.timings[key] = output.timings.get(key, 0.0) + value
        _add_counts(output.details, part.details)
        if checks:
            found["permutation"].append(check_permutation(block, exact=exact["permutation"]))
            found["concat_sum"].append(check_concat_sum(block, weights, exact=exact["concat_sum"]))
        if errors:
            part_errors, part_retained = report_scores(part.modules, block, weights, part.reference_sq_norms)
            result_errors.update(part_errors)
            for adapter_name, entry in part_retained.items():
                retained[adapter_name]["per_module"].update(entry["per_module"])
        del block, part
        _release_freed_memory()
        done += len(names)
        if progress is not None:
            progress(done, total)
    hashed()
    merged = wrap(spec, adapters, output, resolved, k, weights, warnings, elapsed)
    results = {key: _combine_checks(parts) for key, parts in found.items() if parts}
    for entry in retained.values():
        values = entry["per_module"].values()
        entry["mean"] = sum(values) / len(values) if values else 0.0
    return StreamedMerge(merged=merged, checks=results, errors=result_errors,
                         retained={name: {"mean": e["mean"], "per_module": e["per_module"]} for name, e in retained.items()} if errors else {})
