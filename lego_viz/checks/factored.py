"""Norms, inner products and differences of factored sums, never the dense matrix (ARCHITECTURE §3).

A factored sum ``Σ_j s_j B_j A_j`` is kept as its terms ``(B_j (d_out, r_j), A_j (r_j, d_in), s_j)``. Its
Frobenius norm comes from the triangular QR factors of the stacked halves, ``‖U V‖_F = ‖R_U R_Vᵀ‖_F``
with ``U (d_out, m)`` and ``V (m, d_in)``: ``O((d_in + d_out)·m²)`` and, unlike expanding the Gram
identity ``sum((UᵀU)∘(VVᵀ))``, accurate when the sum is nearly zero (which is what a passing check
produces). The same algebra comes twice: on numpy term lists (:func:`array_norm`,
:func:`array_relative_error`: the merge command's exact checks and report, without torch) and on torch
tensors (:class:`Factored` and the functions after it, with the expanded and the random-probe
estimates of a difference); both give the same numbers to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraModule

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

Term = tuple[np.ndarray, np.ndarray, float]  # (B (d_out, r), A (r, d_in), scale)


def array_stacked(terms: Sequence[Term]) -> tuple[np.ndarray, np.ndarray]:
    """``(U (d_out, m), V (m, d_in))`` with ``U V = Σ s·B A``: scales folded into the ``B`` halves (float32)."""
    U = np.concatenate([b if s == 1.0 else b * s for b, _, s in terms], axis=1)
    return U, np.concatenate([a for _, a, _ in terms], axis=0)


def array_norm(terms: Sequence[Term]) -> float:
    """``‖Σ s·B A‖_F`` without forming the sum."""
    U, V = array_stacked(terms)
    r_u = np.linalg.qr(U, mode="r")
    r_v = np.linalg.qr(V.T, mode="r")
    return float(np.linalg.norm(r_u @ r_v.T))


def array_relative_error(reference: Sequence[Term], candidate: Sequence[Term]) -> float:
    """``‖ref − cand‖_F / ‖ref‖_F`` of two factored sums (0 when both are zero)."""
    denom = array_norm(reference)
    diff = array_norm([*reference, *((b, a, -s) for b, a, s in candidate)])
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


# --------------------------------------------------------------------------- on torch tensors


class Factored:
    """A low-rank matrix ``Σ_j s_j · B_j @ A_j`` kept as factor terms.

    ``Factored(B, A)`` is one term. Scales are not multiplied in and sums are not concatenated until
    a norm needs them, so wrapping adapters copies nothing and the random probe reads each weight once.
    """

    def __init__(self, B: torch.Tensor | None = None, A: torch.Tensor | None = None, scale: float = 1.0,
                 terms: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None):
        self.terms = terms if terms is not None else [(B, A, scale)]  # (B (d_out, r_j), A (r_j, d_in), s_j)

    @property
    def B(self) -> torch.Tensor:
        return self.stacked()[0]

    @property
    def A(self) -> torch.Tensor:
        return self.stacked()[1]

    @staticmethod
    def of(module: LoraModule, weight: float = 1.0) -> Factored:
        """The module's update; factors held as numpy arrays (the merge command's) are viewed as tensors."""
        return Factored(torch.as_tensor(module.B), torch.as_tensor(module.A), module.scale * weight)

    @staticmethod
    def concat(parts: Sequence[Factored]) -> Factored:
        """The sum of the parts (= their concatenation as one LoRA)."""
        return Factored(terms=[t for p in parts for t in p.terms])

    def __sub__(self, other: Factored) -> Factored:
        return Factored(terms=self.terms + [(B, A, -s) for B, A, s in other.terms])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (d_out, m), A (m, d_in))`` with the scales folded into B."""
        B = torch.cat([b if s == 1.0 else b * s for b, _, s in self.terms], dim=1)
        return B, torch.cat([a for _, a, _ in self.terms], dim=0)

    @property
    def d_in(self) -> int:
        return self.terms[0][1].shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(ΔW xᵀ)ᵀ`` for probe rows x (p, d_in), through the factors; returns (p, d_out).

        Probes are rows, not columns: with a handful of probes, ``(x Aᵀ) Bᵀ`` runs 4–6× faster on
        CPU BLAS than the skinny ``B (A x)`` (torch 2.13, measured on the reference shapes).
        """
        return sum(((x @ A.T) @ B.T) * s for B, A, s in self.terms)

    def sketch(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``z ΔW xᵀ`` (p, p) for probe rows z (p, d_out) and x (p, d_in), through the factors.

        Each term costs one pass over its factors, ``(z B)(x Aᵀ)ᵀ``, and leaves only p×r numbers.
        """
        return sum(((z @ B) * s) @ (x @ A.T).T for B, A, s in self.terms)


def factored_norm(f: Factored) -> float:
    """Frobenius norm of ``B A`` without forming it."""
    B, A = f.stacked()
    r_b = torch.linalg.qr(B, mode="r").R
    r_a = torch.linalg.qr(A.T, mode="r").R
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def gram_norm(f: Factored) -> float:
    """The same norm via ``sum((BᵀB)∘(AAᵀ))`` (float64). Fast and fine for norms, not for differences."""
    B, A = (t.double() for t in f.stacked())
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())


def relative_error(reference: Factored, candidate: Factored) -> float:
    """``‖ref − cand‖_F / ‖ref‖_F``, from factors (0 when both are zero)."""
    denom = factored_norm(reference)
    diff = factored_norm(reference - candidate)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


# Below this relative error, expanding ‖ref − cand‖² = ‖ref‖² − 2⟨ref, cand⟩ + ‖cand‖² loses the
# digits that matter (float32 products carry ~1e-6 of ‖ref‖²); the QR route is used instead.
EXPANSION_FLOOR = 0.05


def _sq_norm(f: Factored) -> float:
    """‖Σ s_j B_j A_j‖_F² from float32 Gram blocks, summed in float64."""
    total = 0.0
    for i, (b_i, a_i, s_i) in enumerate(f.terms):
        for j, (b_j, a_j, s_j) in enumerate(f.terms[: i + 1]):
            block = float(((b_i.T @ b_j).double() * (a_i @ a_j.T).double()).sum()) * s_i * s_j
            total += block if i == j else 2 * block
    return total


def _inner(f: Factored, g: Factored) -> float:
    """⟨F, G⟩_F = Σ tr((B_fᵀ B_g)(A_g A_fᵀ)) over term pairs (float32 products, float64 sums)."""
    return sum(
        float(((b_f.T @ b_g).double() * (a_f @ a_g.T).double()).sum()) * s_f * s_g
        for b_f, a_f, s_f in f.terms
        for b_g, a_g, s_g in g.terms
    )


def low_rank_relative_error(
    reference: Factored, candidate: Factored, reference_sq: float | None = None, cross: float | None = None,
    candidate_sq: float | None = None,
) -> float:
    """:func:`relative_error` for a candidate of small rank k (a merge), without a QR of the reference.

    Expands the square: the cross term and ``‖cand‖²`` cost ``O((d_in + d_out)·m·k)``; ``‖ref‖²``
    (``O((d_in + d_out)·m²)``) may be passed in by a merge that had it already, and ``cross``
    (``⟨ref, cand⟩``) and ``candidate_sq`` by a caller that computed them for something else
    (:func:`lego_viz.checks.retention.report_scores`). Where the error is below :data:`EXPANSION_FLOOR` the
    expansion cancels, and the exact QR route answers instead.
    """
    ref_sq = _sq_norm(reference) if reference_sq is None else reference_sq
    if ref_sq > 0.0:
        cross = _inner(reference, candidate) if cross is None else cross
        error = expanded_relative_error(ref_sq, cross, _sq_norm(candidate) if candidate_sq is None else candidate_sq)
        if error is not None:
            return error
    return relative_error(reference, candidate)


def expanded_relative_error(reference_sq: float, cross: float, candidate_sq: float) -> float | None:
    """``‖ref − cand‖ / ‖ref‖`` from ``‖ref‖²``, ``⟨ref, cand⟩`` and ``‖cand‖²``; None where the expansion
    cancels (below :data:`EXPANSION_FLOOR`, or a zero reference) and the exact route must answer."""
    error_sq = reference_sq - 2 * cross + candidate_sq
    if reference_sq <= 0.0 or error_sq < EXPANSION_FLOOR**2 * reference_sq:
        return None
    return (error_sq / reference_sq) ** 0.5


def probe_vectors(d_in: int, n_probes: int = 4, seed: int = 0) -> torch.Tensor:
    """Random probe rows (n_probes, d) of width ``d``, the same draw for every module of that width."""
    return torch.randn(n_probes, d_in, generator=torch.Generator().manual_seed(seed))


def probe_pair(
    d_in: int, d_out: int, cache: dict[tuple[str, int], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (p, d_out), x (p, d_in)): left probes from seed 1, right probes from seed 0, drawn once per width."""
    cache = {} if cache is None else cache
    if ("x", d_in) not in cache:
        cache["x", d_in] = probe_vectors(d_in)
    if ("z", d_out) not in cache:
        cache["z", d_out] = probe_vectors(d_out, seed=1)
    return cache["z", d_out], cache["x", d_in]


def _sketch_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return sketch_errors(reference[None].cpu().numpy(), candidate[None].cpu().numpy())[0]


def sketch_errors(reference: np.ndarray, candidate: np.ndarray) -> list[float]:
    """``‖ref − cand‖ / ‖ref‖`` of each of a batch of sketches (b, p, p); 0 where both are zero."""
    reference = reference.astype(np.float64).reshape(len(reference), -1)
    denom = np.linalg.norm(reference, axis=1)
    diff = np.linalg.norm(reference - candidate.astype(np.float64).reshape(len(candidate), -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denom > 0, diff / np.maximum(denom, 1e-300), np.where(diff > 0, np.inf, 0.0))
    return ratio.tolist()


def probe_relative_error(
    reference: Factored, candidate: Factored, probes: tuple[torch.Tensor, torch.Tensor] | None = None
) -> float:
    """Freivalds-style estimate of the same error: ``‖z (ref − cand) xᵀ‖ / ‖z ref xᵀ‖``.

    Random probes on both sides (p = 4 each, so 16 random bilinear forms): every factor is read
    once and nothing of size d_in or d_out is formed, so a probe costs one pass over the factors.
    For Gaussian probes the expected squared numerator and denominator are p² times the squared
    Frobenius norms, so the ratio estimates the relative Frobenius error.

    Args:
        probes: ``(z (p, d_out), x (p, d_in))`` to reuse across modules of the same shape; drawn
            from fixed seeds by default.
    """
    d_out = reference.terms[0][0].shape[0]
    z, x = probes if probes is not None else probe_pair(reference.d_in, d_out)
    return _sketch_error(reference.sketch(z, x), candidate.sketch(z, x))
