"""Checks: the invariances a merge relies on (permutation, concatenation–summation) and how much of
each source adapter a merge keeps (:mod:`~lego_viz.checks.retention`); the norms of factored sums
they share are in :mod:`~lego_viz.checks.factored`.
"""
