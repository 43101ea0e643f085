"""The app's view of the merge: run it from the controls' settings and measure it against the exact sum."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from lego_viz.adapters import LoraAdapter, module_order
from lego_viz.merge import MERGE_METHODS, MergedAdapter, merge
from lego_viz.merge.stream import merge_streaming
from lego_viz.ui.state import MergeSettings, Session


def max_k(adapters: Sequence[LoraAdapter]) -> int:
    """The largest k every module accepts: the fewest units (MSUs) any module has."""
    return min(sum(a.modules[m].r for a in adapters if m in a.modules) for m in module_order(adapters))


def _merge_args(settings: MergeSettings) -> dict:
    """merge()'s method, k and options from the controls; each method gets only the options it declares."""
    spec = MERGE_METHODS.get(settings.method)
    if spec is None:
        raise ValueError(f"unknown merge method {settings.method!r}; choose one of {', '.join(MERGE_METHODS)}")
    options = {name: value for name, value in settings.options().items() if name in spec.options}
    return {"method": settings.method, "k": settings.k if spec.takes_k else None, **options}


def run_merge(adapters: Sequence[LoraAdapter], weights: Sequence[float], settings: MergeSettings) -> MergedAdapter:
    """Merge with the controls' settings."""
    return merge(adapters, weights=list(weights), **_merge_args(settings))


def merged_session(
    session: Session, settings: MergeSettings | None = None, progress: Callable[[int, int], None] | None = None
) -> Session:
    """The session with a merge of its selection under `settings` (reused when already computed).

    ``progress(modules done, total)`` is called as groups of modules finish (the map tab passes gr.Progress).
    """
    settings = settings or session.settings
    if session.merged is not None and session.settings == settings:
        return session
    adapters, weights = session.selected()
    # Group by group, with the errors measured on the same pass (once per merge, so recolouring the
    # map does not pay for them again); the merge is the one merge() gives, bit for bit.
    result = merge_streaming(adapters, weights=list(weights), checks=False, progress=progress, **_merge_args(settings))
    return dataclasses.replace(session, settings=settings, merged=result.merged, merge_errors=result.errors)

