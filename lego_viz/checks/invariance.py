"""Permutation and concatenation–summation checks, in weight space and in output space (ARCHITECTURE §3).

Weight-space errors are computed from the factors alone, exactly (QR factors of the stacked halves)
or by random probes, with the factored-sum algebra of :mod:`lego_viz.checks.factored`.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.checks.factored import (
    Factored,
    array_relative_error,
    probe_pair,
    probe_relative_error,
    relative_error,
    sketch_errors,
)
from lego_viz.units.msu import StackBuffer, module_msus, permute_adapter, stacked

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

DEFAULT_TOLERANCE = 1e-5  # float32 factors: observed errors are ~1e-7, so 1e-5 leaves margin without hiding bugs
# Above this many multiply-adds (Σ over modules of (d_in + d_out)·m²) the exact QR route gives way to
# the random-probe estimate (ARCHITECTURE §3): ~10 s of exact work on a 2-core CPU, where the probe takes ~1 s.
EXACT_BUDGET = 4e9


@dataclass
class CheckResult:
    """Outcome of one invariance check over many modules."""

    name: str
    tolerance: float
    per_module: dict[str, float] = field(default_factory=dict)
    probe_max_rel_error: float = 0.0
    seconds: float = 0.0
    expect_pass: bool = True  # False for the deliberate counter-example (shuffling A alone)
    output_max_abs_diff: float | None = None
    method: str = "exact"  # "exact" (factored QR norms) or "probe" (random-probe estimate, large models)

    @property
    def max_rel_error(self) -> float:
        return max(self.per_module.values(), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return sum(self.per_module.values()) / max(len(self.per_module), 1)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_dict(self, per_module: bool = True) -> dict:
        data = asdict(self)
        if not per_module:
            data.pop("per_module")
        data.update(max_rel_error=self.max_rel_error, mean_rel_error=self.mean_rel_error, passed=self.passed)
        return data


def exact_cost(adapters: Sequence[LoraAdapter], concatenated: bool) -> float:
    """Multiply-adds of the exact check: Σ (d_in + d_out)·m² (m = ranks stacked in the difference)."""
    if not concatenated:
        return sum((m.d_in + m.d_out) * (2 * m.r) ** 2 for a in adapters for m in a.modules.values())
    totals: dict[str, list[int]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            entry = totals.setdefault(name, [m.d_in + m.d_out, 0])
            entry[1] += 2 * m.r
    return sum(d * r * r for d, r in totals.values())


def _run(
    name: str, pairs: Iterator[tuple[str, Factored, Factored]], tolerance: float, exact: bool, expect_pass: bool = True
) -> CheckResult:
    start = time.perf_counter()
    result = CheckResult(name=name, tolerance=tolerance, expect_pass=expect_pass, method="exact" if exact else "probe")
    probes: dict[tuple[str, int], torch.Tensor] = {}  # the same seeded draws for every module of a width
    for key, reference, candidate in pairs:
        probe = probe_relative_error(reference, candidate, probe_pair(reference.d_in, reference.terms[0][0].shape[0], probes))
        result.per_module[key] = relative_error(reference, candidate) if exact else probe
        result.probe_max_rel_error = max(result.probe_max_rel_error, probe)
    result.seconds = time.perf_counter() - start
    return result


def check_permutation(
    adapters: Sequence[LoraAdapter],
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    shuffle: str = "both",
    exact: bool | None = None,
) -> CheckResult:
    """Shuffle the ranks of every module and compare ΔW before and after (ARCHITECTURE §3.1).

    Args:
        adapters: adapters to check (each on its own).
        seed: RNG seed of the permutations.
        tolerance: pass threshold on the relative Frobenius error.
        shuffle: ``"both"`` permutes rows of A with the matching columns of B (invariant);
            ``"a_only"`` permutes A alone — the counter-example that breaks the pairing.
        exact: exact factored errors (True), the random-probe estimate (False), or exact unless
            the work exceeds :data:`EXACT_BUDGET` (None).
    """
    if shuffle not in ("both", "a_only"):
        raise ValueError(f"shuffle must be 'both' or 'a_only', got {shuffle!r}.")
    perms = _permutations(adapters, seed)

    def pairs():
        # One module at a time: the shuffled copy of a module lives only while it is checked.
        for t, adapter in enumerate(adapters):
            for name, lora in adapter.modules.items():
                perm = torch.from_numpy(perms[t, name])
                # index_select: ~6× faster than advanced indexing for B's column gather on CPU.
                moved_b = lora.B if shuffle == "a_only" else lora.B.index_select(1, perm)
                moved = LoraModule(A=lora.A.index_select(0, perm), B=moved_b, scale=lora.scale, fan_in_fan_out=lora.fan_in_fan_out)
                yield f"{adapter.name}:{name}", Factored.of(lora), Factored.of(moved)

    label = "permutation" if shuffle == "both" else "permutation_a_only"
    exact = exact if exact is not None else exact_cost(adapters, concatenated=False) <= EXACT_BUDGET
    if not exact:  # one probe of every unit does it (and the same draws as below)
        return _timed(probe_checks, adapters, seed=seed, tolerance=tolerance, shuffle=shuffle)[0]
    return _run(label, pairs(), tolerance, exact, expect_pass=shuffle == "both")


def check_concat_sum(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    exact: bool | None = None,
) -> CheckResult:
    """Compare ``Σ_t w_t ΔW_t`` with the single LoRA made of all concatenated units (ARCHITECTURE §3.2).

    ``exact`` as in :func:`check_permutation`.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    modules = module_order(adapters)

    def pairs():
        for name in modules:
            parts = [Factored.of(a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules]
            table = module_msus(adapters, name, weights)
            B, A = table.factors()
            yield name, Factored.concat(parts), Factored(B, A)

    exact = exact if exact is not None else exact_cost(adapters, concatenated=True) <= EXACT_BUDGET
    if not exact:
        return _timed(probe_checks, adapters, weights, tolerance=tolerance)[1]
    return _run("concat_sum", pairs(), tolerance, exact)


def check_permutation_arrays(adapters: Sequence[LoraAdapter], seed: int = 0, tolerance: float = DEFAULT_TOLERANCE) -> CheckResult:
    """:func:`check_permutation` with ``exact=True`` on factors held as numpy arrays, without torch (the
    merge command's small inputs): the same permutation draws and factored differences, through
    :mod:`lego_viz.checks.factored`, so the errors agree with the tensor route's to float32 rounding.
    The random-probe column (``probe_max_rel_error``) is left at 0 for the caller, who has the
    units' probes (:func:`probe_checks`).
    """
    start = time.perf_counter()
    perms = _permutations(adapters, seed)
    result = CheckResult(name="permutation", tolerance=tolerance)
    for t, adapter in enumerate(adapters):
        for name, lora in adapter.modules.items():
            perm = perms[t, name]
            result.per_module[f"{adapter.name}:{name}"] = array_relative_error(
                [(lora.B, lora.A, lora.scale)], [(lora.B[:, perm], lora.A[perm], lora.scale)])
    result.seconds = time.perf_counter() - start
    return result


def check_concat_sum_arrays(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], tolerance: float = DEFAULT_TOLERANCE
) -> CheckResult:
    """:func:`check_concat_sum` with ``exact=True`` on numpy factors, as :func:`check_permutation_arrays`."""
    start = time.perf_counter()
    result = CheckResult(name="concat_sum", tolerance=tolerance)
    for name in module_order(adapters):
        present = [(a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules]
        # the concatenated LoRA as module_msus folds it: √s on both halves, the weight on B
        folded = [(lora.B * (lora.scale**0.5 * w), lora.A * lora.scale**0.5, 1.0) for lora, w in present]
        result.per_module[name] = array_relative_error([(lora.B, lora.A, lora.scale * w) for lora, w in present], folded)
    result.seconds = time.perf_counter() - start
    return result


def _timed(checks: Callable[..., tuple[CheckResult, ...]], *args, **kwargs) -> tuple[CheckResult, ...]:
    """``checks(*args, **kwargs)``, each result timed as the whole call (the caller keeps one of them)."""
    start = time.perf_counter()
    results = checks(*args, **kwargs)
    for result in results:
        result.seconds = time.perf_counter() - start
    return results


def span_probes(gram_a: np.ndarray, gram_b: np.ndarray, n_probes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probe products of units from their Gram matrices: ``u = c_x (A Aᵀ)``, ``v = c_z (Bᵀ B)`` (p, n).

    They are the products of every unit with the probes ``x = c_x A`` and ``z = c_z Bᵀ``, for
    Gaussian coefficients ``c`` (p, n) drawn from ``seed``; see :func:`probe_checks`. A batch of
    Gram matrices (m, n, n) gets the same draw for each, (m, p, n).
    """
    c_x, c_z = _span_coefficients(gram_a.shape[-1], n_probes, seed)
    return c_x.astype(gram_a.dtype) @ gram_a, c_z.astype(gram_b.dtype) @ gram_b


def factor_probes(A: np.ndarray, B: np.ndarray, n_probes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`span_probes` from the stacked factors ``A`` (n, d_in), ``B`` (d_out, n) float32 instead of their
    Gram matrices (too many units for them): ``u = (c_x A) Aᵀ``, ``v = (c_z Bᵀ) B`` (p, n), the same probes."""
    c_x, c_z = _span_coefficients(A.shape[0], n_probes, seed)
    return (c_x @ A) @ A.T, (c_z @ B.T) @ B


def _span_coefficients(n: int, n_probes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c_x, c_z = (rng.standard_normal((n_probes, n), dtype=np.float32) for _ in range(2))
    return c_x, c_z


def _permutations(adapters: Sequence[LoraAdapter], seed: int) -> dict[tuple[int, str], np.ndarray]:
    """The permutation of every module's ranks, adapter by adapter: the same draws for both routes of the checks."""
    rng = np.random.default_rng(seed)
    return {(t, name): rng.permutation(lora.r) for t, a in enumerate(adapters) for name, lora in a.modules.items()}


def _starts(ranks: Sequence[int]) -> list[int]:
    """First unit of each adapter's block when blocks of these ranks are stacked."""
    return [0, *itertools.accumulate(ranks)][:-1]


# One batch of probe_checks: modules with the same adapters, ranks, scales and weights (``present``: per
# adapter (index, r, scale, weight)), probe count and dtype.
_BatchKey = tuple[tuple[tuple[int, int, float, float], ...], int, np.dtype]


def _probed_units(
    adapters: Sequence[LoraAdapter], weights: list[float], perms: dict[tuple[int, str], np.ndarray],
    unit_probes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
) -> dict[_BatchKey, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]:
    """Every module's probed units ``u = x Aᵀ``, ``v = z B`` (p, n) and its permutation of the stacked units,
    grouped into batches: ``{key: [(name, u, v, moved), ...]}``. Given ``unit_probes`` read no weights."""
    batches: dict[_BatchKey, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]] = {}
    probes: dict[tuple[str, int], torch.Tensor] = {}
    buffers = (StackBuffer(), StackBuffer())  # one reused copy per side: fresh ones cost more in page faults
    for name in module_order(adapters):
        present = [(t, a.modules[name], w) for t, (a, w) in enumerate(zip(adapters, weights)) if name in a.modules]
        if unit_probes and name in unit_probes:
            u, v = unit_probes[name]
        else:
            first = present[0][1]
            z, x = probe_pair(first.d_in, first.d_out, probes)
            u = (x @ stacked([lora.A for _, lora, _ in present], 0, buffers[0]).T).cpu().numpy()  # (p, n)
            v = (z @ stacked([lora.B for _, lora, _ in present], 1, buffers[1])).cpu().numpy()  # (p, n)
        key = (tuple((t, lora.r, lora.scale, w) for t, lora, w in present), u.shape[0], u.dtype)
        moved = np.concatenate([perms[t, name] + begin for (t, _, _), begin in zip(present, _starts([lora.r for _, lora, _ in present]))])
        batches.setdefault(key, []).append((name, u, v, moved))
    return batches


def _batch_errors(
    key: _BatchKey, members: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], shuffle: str
) -> tuple[list[float], list[float]]:
    """One batch's errors from its probed units: per module and adapter (module-major) the permutation's,
    per module the concatenation's."""
    present, _, dtype = key
    u, v, moved = (np.stack([member[i] for member in members]) for i in (1, 2, 3))  # (m, p, n) ×2, (m, n)
    ranks = [r for _, r, _, _ in present]
    starts = _starts(ranks)  # first unit of each adapter's block
    block = np.repeat(np.arange(len(present)), ranks)  # (n,) adapter block of each unit
    scale = np.repeat(np.array([s for _, _, s, _ in present], dtype=dtype), ranks)
    weight = np.array([w for _, _, _, w in present], dtype=dtype)
    # Every unit's rank-one sketch v_i u_iᵀ (m, n, p, p); an adapter's update sums its units' sketches.
    u, v = np.swapaxes(u, 1, 2), np.swapaxes(v, 1, 2)  # (m, n, p)
    sketches = v[..., :, None] * u[..., None, :] * scale[:, None, None]
    moved_v = v if shuffle == "a_only" else np.take_along_axis(v, moved[..., None], 1)
    moved_sketches = moved_v[..., :, None] * np.take_along_axis(u, moved[..., None], 1)[..., None, :] * scale[:, None, None]
    own = np.add.reduceat(sketches, starts, axis=1)  # (m, T, p, p)
    shuffled = np.add.reduceat(moved_sketches, starts, axis=1)
    p = sketches.shape[-1]
    permutation = sketch_errors(own.reshape(-1, p, p), shuffled.reshape(-1, p, p))
    # the weighted sum of the adapters' updates vs the concatenated LoRA (scale and weight per unit)
    summed = (own * weight[:, None, None]).sum(axis=1)
    concatenated = (sketches * weight[block][:, None, None]).sum(axis=1)
    return permutation, sketch_errors(summed, concatenated)


def probe_checks(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    shuffle: str = "both",
    unit_probes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[CheckResult, CheckResult]:
    """Both checks by random probes, each unit probed once: what a merge of large inputs runs.

    Per module the stacked units (all adapters' ``A`` rows and ``B`` columns) are probed in one
    pass, ``u = x Aᵀ`` and ``v = z B`` (p × n). Every arrangement under test is then evaluated on
    the probed units: adapter t's update is ``s_t v_t u_tᵀ``; its shuffled copy ``s_t v_t[π] u_t[π]ᵀ``;
    the weighted sum ``Σ_t w_t s_t v_t u_tᵀ``; the concatenated LoRA ``v diag(w s) uᵀ``. The
    results are those of :func:`check_permutation` and :func:`check_concat_sum` with
    ``exact=False`` — same probes, same permutation draws — at one read of the factors instead of
    four copies and eight reads.

    Where a merge has computed the units' Gram matrices (lego), the probes can be random
    combinations of the units themselves, ``x = c_x A`` and ``z = c_z Bᵀ``, so that ``u = c_x (A Aᵀ)``
    and ``v = c_z (Bᵀ B)`` come from the Gram matrices and the checks read no weights at all
    (:func:`span_probes`). Every update compared lies in the units' span, where such probes detect
    any difference as Gaussian ones do.

    Args:
        adapters, weights, tolerance: as in :func:`check_concat_sum`.
        seed: seed of the permutations, as in :func:`check_permutation`.
        shuffle: ``"both"`` or the counter-example ``"a_only"`` (as in :func:`check_permutation`).
        unit_probes: per module ``(u, v)`` (p, n) computed already (:func:`span_probes`).

    Returns:
        ``(permutation, concat_sum)`` results (method ``"probe"``); the time, spent on both at
        once, is split evenly between them.
    """
    if shuffle not in ("both", "a_only"):
        raise ValueError(f"shuffle must be 'both' or 'a_only', got {shuffle!r}.")
    start = time.perf_counter()
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    label = "permutation" if shuffle == "both" else "permutation_a_only"
    permutation = CheckResult(name=label, tolerance=tolerance, expect_pass=shuffle == "both", method="probe")
    concat = CheckResult(name="concat_sum", tolerance=tolerance, method="probe")
    for key, members in _probed_units(adapters, weights, _permutations(adapters, seed), unit_probes).items():
        present, names = key[0], [name for name, *_ in members]
        errors, concat_errors = _batch_errors(key, members, shuffle)
        for i, name in enumerate(names):
            for (t, *_), error in zip(present, errors[i * len(present) : (i + 1) * len(present)]):
                permutation.per_module[f"{adapters[t].name}:{name}"] = error
        concat.per_module.update(zip(names, concat_errors))
    # in the order the other checks report them: adapter by adapter, module by module
    permutation.per_module = {key: permutation.per_module[key] for key in (f"{a.name}:{m}" for a in adapters for m in a.modules)}
    concat.per_module = {name: concat.per_module[name] for name in module_order(adapters)}
    permutation.probe_max_rel_error = max(permutation.per_module.values(), default=0.0)
    concat.probe_max_rel_error = max(concat.per_module.values(), default=0.0)
    permutation.seconds = concat.seconds = (time.perf_counter() - start) / 2
    return permutation, concat


# --------------------------------------------------------------------------- output space


@contextlib.contextmanager
def lora_hooks(model: torch.nn.Module, *module_sets: Mapping[str, LoraModule]) -> Iterator[None]:
    """Temporarily add LoRA updates to a model's layers with forward hooks.

    Each mapping is module name (relative to the base model, as in PEFT keys without
    ``base_model.model.``) → LoRA module; several mappings add up. ``y += s·(x Aᵀ) Bᵀ`` works for
    ``nn.Linear`` and for GPT-2 ``Conv1D`` alike, since both map ``(…, d_in) → (…, d_out)``.
    """
    named = dict(model.named_modules())
    grouped: dict[str, list[LoraModule]] = {}
    for mapping in module_sets:
        for name, lora in mapping.items():
            if name not in named:
                raise KeyError(f"the model has no module {name!r}; the adapter was trained on a different architecture.")
            grouped.setdefault(name, []).append(lora)
    handles = []

    def make_hook(loras: list[LoraModule]):
        def hook(_module, inputs, output):
            x = inputs[0]
            extra = sum(lora.scale * ((x @ lora.A.to(x).T) @ lora.B.to(x).T) for lora in loras)
            return output + extra

        return hook

    try:
        for name, loras in grouped.items():
            handles.append(named[name].register_forward_hook(make_hook(loras)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits_with(model: torch.nn.Module, input_ids: torch.Tensor, *module_sets: Mapping[str, LoraModule]) -> torch.Tensor:
    """Logits of ``model`` on ``input_ids`` with the given LoRA module sets applied."""
    with torch.no_grad(), lora_hooks(model, *module_sets):
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out[0]


def output_max_abs_diff(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    reference: Sequence[Mapping[str, LoraModule]],
    candidate: Sequence[Mapping[str, LoraModule]],
) -> float:
    """Max abs difference of logits: reference module sets applied together vs candidate sets."""
    ref = logits_with(model, input_ids, *reference)
    cand = logits_with(model, input_ids, *candidate)
    return float((ref - cand).abs().max())


def concatenated_modules(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> dict[str, LoraModule]:
    """One LoRA (scale 1, folded) per module holding every adapter's units: rank Σ r_t."""
    from lego_viz.units.msu import adapter_msus, table_to_module

    return {name: table_to_module(t) for name, t in adapter_msus(adapters, weights).items()}


def weighted_modules(adapter: LoraAdapter, weight: float) -> dict[str, LoraModule]:
    """The adapter's modules with the weight folded into the scale."""
    return {
        n: LoraModule(A=m.A, B=m.B, scale=m.scale * weight, fan_in_fan_out=m.fan_in_fan_out)
        for n, m in adapter.modules.items()
    }


def check_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Both invariances in output space: max abs logit differences.

    Returns:
        ``permutation`` (first adapter vs its shuffled copy), ``permutation_a_only`` (the broken
        shuffle), ``concat_sum`` (all adapters applied together vs their concatenation).
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    gen = torch.Generator().manual_seed(seed)
    first = adapters[0]
    shuffled, _ = permute_adapter(first, gen)
    broken = {
        n: LoraModule(A=shuffled.modules[n].A, B=m.B, scale=m.scale, fan_in_fan_out=m.fan_in_fan_out)
        for n, m in first.modules.items()
    }
    summed = [weighted_modules(a, w) for a, w in zip(adapters, weights)]
    return {
        "permutation": output_max_abs_diff(model, input_ids, [first.modules], [shuffled.modules]),
        "permutation_a_only": output_max_abs_diff(model, input_ids, [first.modules], [broken]),
        "concat_sum": output_max_abs_diff(model, input_ids, summed, [concatenated_modules(adapters, weights)]),
    }
