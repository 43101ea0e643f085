"""Merge methods behind one call, ``merge(adapters, method="lego", k=8, weights=None, **options)``.

The methods, in menu order, are listed in :mod:`lego_viz.merge.registry`; :mod:`lego_viz.merge.api`
validates a call and wraps a method's output; the one-pass reader and the streaming driver for inputs
larger than memory are :mod:`~lego_viz.merge.first_pass` and :mod:`~lego_viz.merge.stream`.
"""

from lego_viz.merge.api import MergePlan, merge, plan, resolve_k, wrap
from lego_viz.merge.base import MergedAdapter, MergeError, MergeMethod, MethodOutput, Option
from lego_viz.merge.lego import PRESETS
from lego_viz.merge.registry import MERGE_METHODS

__all__ = ["MERGE_METHODS", "PRESETS", "MergeError", "MergeMethod", "MergePlan", "MergedAdapter", "MethodOutput", "Option", "merge",
           "plan", "resolve_k", "wrap"]
