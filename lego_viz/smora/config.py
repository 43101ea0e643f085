"""SMoRA configuration: one frozen dataclass, saved as JSON next to the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GATE_MODES = ("authors", "sigma")


@dataclass(frozen=True)
class SMoRAConfig:
    """Settings of a SMoRA adapter (ARCHITECTURE §6).

    Args:
        r: Number of ranks (experts) per layer.
        k: Number of active ranks per token, `1 <= k <= r`.
        lora_alpha: Output scale numerator; the update is scaled by `lora_alpha / k`.
        target_modules: Module-name suffixes to wrap (PEFT matching: exact name or `.`-suffix),
            or `("all-linear",)` for every linear / `Conv1D` layer except the output head.
        gate: `"authors"` (gates from `σ + β`, the published code) or `"sigma"` (`β` only steers the
            selection, gates from `σ`, as in loss-free balancing for MoE LLMs).
        rank_partition: `p`, ranks routed together in blocks of `p` (router has `r / p` outputs).
        gamma: Step of the loss-free balancing update of `β`; 0 disables balancing.
        lora_dropout: Dropout on the LoRA input during training.
        train_lora: Whether `lora_A` / `lora_B` are trained (False: only the router learns,
            e.g. a router over frozen merged MSUs).
        sources: Names of source adapters when the ranks are concatenated MSUs of other adapters
            (each layer then records the source index of each rank).
        base_model: Name or path of the base model, for the record.
    """

    r: int = 32
    k: int = 4
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    gate: str = "authors"
    rank_partition: int = 1
    gamma: float = 1e-3
    lora_dropout: float = 0.0
    train_lora: bool = True
    sources: tuple[str, ...] = ()
    base_model: str | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.r < 1:
            raise ValueError(f"SMoRA r must be >= 1, got {self.r}")
        if not 1 <= self.k <= self.r:
            raise ValueError(f"SMoRA k must be in [1, r={self.r}], got {self.k}")
        if self.gate not in GATE_MODES:
            raise ValueError(f"unknown SMoRA gate {self.gate!r}; expected one of {GATE_MODES}")
        p = self.rank_partition
        if p < 1 or self.r % p or self.k % p:
            raise ValueError(
                f"rank_partition p={p} must be >= 1 and divide both r={self.r} and k={self.k} "
                "(ranks are routed in whole blocks of p)"
            )
        if self.gamma < 0:
            raise ValueError(f"balancing step gamma must be >= 0, got {self.gamma}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module suffix or 'all-linear'")

    @property
    def n_routes(self) -> int:
        """Number of router outputs, `r / rank_partition`."""
        return self.r // self.rank_partition

    @property
    def k_routes(self) -> int:
        """Number of router outputs selected per token, `k / rank_partition`."""
        return self.k // self.rank_partition

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules), "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SMoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SMoRA config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
