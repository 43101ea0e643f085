"""The app's view of the merge: run it from the controls' settings and measure it against the exact sum."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lego_viz.adapters import LoraAdapter, module_order
from lego_viz.export import reconstruction_errors
from lego_viz.merge import MERGE_METHODS, MergedAdapter, merge
from lego_viz.ui.state import MergeSettings, Session


def max_k(adapters: Sequence[LoraAdapter]) -> int:
    """The largest k every module accepts: the fewest units (MSUs) any module has."""
    return min(sum(a.modules[m].r for a in adapters if m in a.modules) for m in module_order(adapters))


def run_merge(adapters: Sequence[LoraAdapter], weights: Sequence[float], settings: MergeSettings) -> MergedAdapter:
    """Merge with the controls' settings; each method gets only the options it declares."""
    spec = MERGE_METHODS.get(settings.method)
    if spec is None:
        raise ValueError(f"unknown merge method {settings.method!r}; choose one of {', '.join(MERGE_METHODS)}")
    options = {name: value for name, value in settings.options().items() if name in spec.options}
    return merge(adapters, settings.method, k=settings.k if spec.takes_k else None, weights=list(weights), **options)


def merged_session(session: Session, settings: MergeSettings | None = None) -> Session:
    """The session with a merge of its selection under `settings` (reused when already computed)."""
    settings = settings or session.settings
    if session.merged is not None and session.settings == settings:
        return session
    adapters, weights = session.selected()
    merged = run_merge(adapters, weights, settings)
    # Measured once per merge, so recolouring the map does not pay for it again.
    errors = reconstruction_errors(merged, adapters)
    return dataclasses.replace(session, settings=settings, merged=merged, merge_errors=errors)

