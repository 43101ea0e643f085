"""Norms of factored sums on numpy arrays: the merge command's exact checks and report without torch (ARCHITECTURE §3).

A factored sum is a list of terms ``(B (d_out, r), A (r, d_in), s)`` standing for ``Σ s·B A``. Its
Frobenius norm comes from the triangular QR factors of the stacked halves, ``‖U V‖_F = ‖R_U R_Vᵀ‖_F``
with ``U (d_out, m)`` and ``V (m, d_in)``: ``O((d_in + d_out)·m²)`` and, unlike expanding the Gram
identity, accurate when the sum is nearly zero (which is what a passing check produces). The same
algebra on tensors is :class:`lego_viz.checks.invariance.Factored`; both give the same numbers to
float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Term = tuple[np.ndarray, np.ndarray, float]  # (B (d_out, r), A (r, d_in), scale)


def stacked(terms: Sequence[Term]) -> tuple[np.ndarray, np.ndarray]:
    """``(U (d_out, m), V (m, d_in))`` with ``U V = Σ s·B A``: scales folded into the ``B`` halves (float32)."""
    U = np.concatenate([b if s == 1.0 else b * s for b, _, s in terms], axis=1)
    return U, np.concatenate([a for _, a, _ in terms], axis=0)


def norm(terms: Sequence[Term]) -> float:
    """``‖Σ s·B A‖_F`` without forming the sum."""
    U, V = stacked(terms)
    r_u = np.linalg.qr(U, mode="r")
    r_v = np.linalg.qr(V.T, mode="r")
    return float(np.linalg.norm(r_u @ r_v.T))


def relative_error(reference: Sequence[Term], candidate: Sequence[Term]) -> float:
    """``‖ref − cand‖_F / ‖ref‖_F`` of two factored sums (0 when both are zero)."""
    denom = norm(reference)
    diff = norm([*reference, *((b, a, -s) for b, a, s in candidate)])
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom
