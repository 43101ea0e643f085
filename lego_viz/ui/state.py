"""Per-session state of the app, kept in one `gr.State` and replaced (never mutated) by each event.

Handlers build a new `Session` and return it; when a handler raises `gr.Error` Gradio leaves the
state as it was, so a failed load or merge never leaves a half-updated session behind.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from lego_viz.adapters import AdapterError, LoraAdapter, check_compatible
from lego_viz.merge import MERGE_METHODS, MergedAdapter
from lego_viz.ui.runtime import MAX_ADAPTERS

RESCALE_MODES = MERGE_METHODS["lego"].options["rescale"].choices


@dataclass(frozen=True)
class MergeSettings:
    """The merge controls of the map tab, validated the same way for the UI and the API."""

    method: str = "lego"
    k: int = 8
    features: str = "canonical"
    param_reweight: str = "l2"
    output_reweight: bool = True
    seed: int = 0
    rescale: str = "none"  # lego's data-free least-squares rescaling of the merged ranks: "none" or "lsq"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.rescale not in RESCALE_MODES:
            raise ValueError(f"rescale must be one of {', '.join(RESCALE_MODES)}, got {self.rescale!r}")

    def options(self) -> dict:
        """Every option the controls set, by merge-option name (each method takes the ones it knows)."""
        return {
            "features": self.features, "param_reweight": self.param_reweight,
            "output_reweight": self.output_reweight, "seed": self.seed, "rescale": self.rescale,
        }


@dataclass(frozen=True)
class Session:
    """What one browser tab (or one `gradio_client`) has loaded and computed."""

    adapters: tuple[LoraAdapter, ...] = ()
    use: tuple[bool, ...] = ()
    weights: tuple[float, ...] = ()
    settings: MergeSettings = field(default_factory=MergeSettings)
    merged: MergedAdapter | None = None  # the merge of the current selection and settings, if computed
    merge_errors: dict[str, float] | None = None  # per module ‖ΔW_merge − Σ w·ΔW‖ / ‖Σ w·ΔW‖ of `merged`
    export_dir: str | None = None  # temp folder of the last export, removed with the session
    advice: dict | None = None  # the "Which k?" suggestion for the current selection (lego_viz.merge.advise.Advice.summary)

    def with_adapters(self, adapters: Sequence[LoraAdapter], replace: bool) -> Session:
        """A session holding `adapters` (added to or replacing the current ones), all selected at weight 1."""
        kept = () if replace else self.adapters
        combined = list(kept) + _unique_names(adapters, {a.name for a in kept})
        if len(combined) > MAX_ADAPTERS:
            raise AdapterError(f"at most {MAX_ADAPTERS} adapters per session; remove some (Clear) before adding more.")
        if combined:
            check_compatible(combined)
        return dataclasses.replace(
            self,
            adapters=tuple(combined),
            use=(self.use if not replace else ()) + (True,) * (len(combined) - len(kept)),
            weights=(self.weights if not replace else ()) + (1.0,) * (len(combined) - len(kept)),
            merged=None,
            merge_errors=None,
            advice=None,
        )

    def with_selection(self, use: Sequence[bool], weights: Sequence[float]) -> Session:
        """The same adapters with another selection; the merge is dropped since it no longer matches."""
        n = len(self.adapters)
        return dataclasses.replace(
            self, use=tuple(bool(u) for u in use[:n]), weights=tuple(float(w) for w in weights[:n]),
            merged=None, merge_errors=None, advice=None,
        )

    def selected(self) -> tuple[list[LoraAdapter], list[float]]:
        """The adapters ticked "use" with a non-zero weight, and their weights; raises when none is.

        Weight 0 leaves an adapter out, as unticking does: kept in, its units (zero once weighted)
        would only use up merged ranks and crowd the map.
        """
        ticked = [(a, w) for a, u, w in zip(self.adapters, self.use, self.weights) if u]
        if not ticked:
            raise AdapterError("no adapter selected: load the demo zoo or an adapter, and tick 'use' for at least one.")
        pairs = [(a, w) for a, w in ticked if w != 0]
        if not pairs:
            raise AdapterError("all adapter weights are zero; the merge would be empty. Give at least one ticked adapter a non-zero weight.")
        return [a for a, _ in pairs], [w for _, w in pairs]


def _unique_names(adapters: Sequence[LoraAdapter], taken: set[str]) -> list[LoraAdapter]:
    # Renames copies, never the caller's objects, which may be shared (e.g. the cached zoo).
    result = []
    taken = set(taken)
    for adapter in adapters:
        name, n = adapter.name, 2
        while name in taken:
            name, n = f"{adapter.name}_{n}", n + 1
        taken.add(name)
        result.append(adapter if name == adapter.name else dataclasses.replace(adapter, name=name))
    return result


def cleanup(session: Session | None) -> None:
    """Remove a session's temp files (the `gr.State` delete callback)."""
    if session is not None and session.export_dir:
        shutil.rmtree(session.export_dir, ignore_errors=True)
