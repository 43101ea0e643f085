"""Zero-shot rank routing over pooled MSUs (Arrow-style): a dynamic merge with no data and no training.

Arrow (Ostapenko et al. 2024, "Towards modular LLMs by building and reusing a library of LoRAs") routes
each token to the adapters whose principal input direction best matches the hidden state `x` entering a
layer: `v_t` is the top right singular vector of `ΔW_t`, the score `|v_t · x|` (sign-free, since `v_t`
is only defined up to sign), and a softmax over the top-k scores weighs the selected adapters' updates.
Here the same idea also runs one level finer, on the units themselves:

* `adapter` granularity — routes are the source adapters of a module; the selected adapters' updates
  are averaged with softmax weights (temperature τ), as in Arrow and PEFT's `ArrowConfig`. With one
  adapter and k = 1 the layer is that adapter.
* `unit` granularity — routes are the pooled units; unit `i` scores `|ã_i · x| / ‖ã_i‖` (its input
  direction) and each of the top-k units adds its whole folded update (gate 1), so k = all units is
  the exact weighted sum, and k units per token is an update of rank k like a static merge at rank k.

Everything stays factored: `v_t` comes from a QR of each factor and an SVD of an `r×r` core, and a
token costs one `(n, d_in)` product for the scores (free at unit granularity: the unit scores are the
`A x` the update needs anyway, rescaled) plus `(n, d_in)` and `(d_out, n)` products for the update.
The routing is applied with forward hooks, so the base model is never modified.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lego_viz.adapters import LoraAdapter, check_compatible
from lego_viz.merge.base import MergeError
from lego_viz.units.msu import MSUTable, adapter_msus

GRANULARITIES = ("unit", "adapter")
# Units with (near-)zero input direction score 0 instead of dividing by ~0.
_TINY = 1e-12


class RoutingError(MergeError):
    """Zero-shot routing cannot run with these adapters or options; the message says what to change."""


@dataclass(frozen=True)
class ArrowConfig:
    """Settings of zero-shot routing.

    Args:
        granularity: `"unit"` (route among the pooled units) or `"adapter"` (among source adapters, Arrow).
        top_k: Routes selected per token: units at `unit` granularity, adapters at `adapter` granularity.
        temperature: Softmax temperature τ of the adapter weights (`adapter` granularity only; > 0).
    """

    granularity: str = "unit"
    top_k: int = 8
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise RoutingError(f"unknown routing granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RoutingError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if not self.temperature > 0:
            raise RoutingError(f"temperature must be > 0, got {self.temperature!r}.")

    @property
    def label(self) -> str:
        """A short name, e.g. `arrow (units, top-8)` or `arrow (adapter, top-1)`."""
        what = "units" if self.granularity == "unit" else "adapter"
        return f"arrow ({what}, top-{self.top_k})"


def principal_directions(table: MSUTable) -> torch.Tensor:
    """The top right singular vector of each source adapter's update in one module, from its factors.

    With `ΔW_t = B̃_t Ã_t`, QR gives `B̃_t = Q_B R_B` and `Ã_tᵀ = Q_A R_A`, so `ΔW_t = Q_B (R_B R_Aᵀ) Q_Aᵀ`
    and the top right singular vector is `Q_A v` with `v` that of the `r×r` core — never `d_out×d_in`.

    Args:
        table: The pooled units of one module (adapters in consecutive blocks, as `module_msus` gives them).

    Returns:
        `(T, d_in)`, one unit vector per adapter present in the module (sign arbitrary), in block order.
    """
    directions, start = [], 0
    for width in table.block_ranks():
        a, b = table.a[start : start + width].double(), table.b[start : start + width].double()  # (r, d_in), (r, d_out)
        q_a, r_a = torch.linalg.qr(a.T)  # (d_in, r'), (r', r)
        _, r_b = torch.linalg.qr(b.T)  # (r'', r)
        _, _, vh = torch.linalg.svd(r_b @ r_a.T)  # core (r'', r')
        directions.append((q_a @ vh[0]).float())
        start += width
    return torch.stack(directions)


class ArrowRouter(nn.Module):
    """Per-token gates of one module's pooled units, from the hidden state entering the module.

    Its own module (like `SMoRARouter`), so a forward hook on it sees the gates at no extra cost:
    `RoutingRecorder` and the SMoRA probes record it unchanged.

    Args:
        keys: Route directions, `(n_routes, d_in)`: the units' `ã_i` (unit) or the adapters' `v_t` (adapter).
        route_of_unit: The route of each unit, `(n,)`: `i` (unit) or the unit's adapter block (adapter).
        config: Granularity, k and temperature.
    """

    def __init__(self, keys: torch.Tensor, route_of_unit: torch.Tensor, config: ArrowConfig) -> None:
        super().__init__()
        self.config = config
        if config.granularity == "unit":
            # Unit scores reuse `A x`: only the inverse norms are kept.
            self.register_buffer("inv_norm", 1.0 / keys.norm(dim=1).clamp_min(_TINY))
        else:
            self.register_buffer("keys", keys / keys.norm(dim=1, keepdim=True).clamp_min(_TINY))
        self.register_buffer("route_of_unit", route_of_unit.long())
        self.n_routes = keys.shape[0]

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Gates `(..., n)` for inputs `x (..., d_in)` whose unit activations are `hidden = x Ãᵀ (..., n)`."""
        k = self.config.top_k
        if self.config.granularity == "unit":
            scores = hidden.abs() * self.inv_norm.to(hidden)
            top = scores.topk(k, dim=-1).indices
            return torch.zeros_like(hidden).scatter(-1, top, 1.0)
        scores = (x @ self.keys.to(x).T).abs()  # (..., T)
        top = scores.topk(k, dim=-1)
        weights = torch.softmax(top.values / self.config.temperature, dim=-1)
        route_gates = torch.zeros_like(scores).scatter(-1, top.indices, weights)
        return route_gates.index_select(-1, self.route_of_unit)


class ArrowLayer(nn.Module):
    """The routed update of one module: `Σ_i g_i(x) · b̃_i (ã_i · x)` over its pooled units.

    Attributes mirror `SMoRALinear` (`lora_A (n, d_in)`, `lora_B (d_out, n)`, `unit_source (n,)`,
    `router`), so the SMoRA probes and figures read either.
    """

    def __init__(self, table: MSUTable, config: ArrowConfig) -> None:
        super().__init__()
        self.register_buffer("lora_A", table.a.contiguous())
        self.register_buffer("lora_B", table.b.T.contiguous())
        self.register_buffer("unit_source", table.adapter_index.clone())
        if config.granularity == "unit":
            keys, route_of_unit = table.a, torch.arange(table.n)
        else:
            keys = principal_directions(table)
            route_of_unit = torch.repeat_interleave(torch.arange(keys.shape[0]), torch.tensor(table.block_ranks()))
        self.router = ArrowRouter(keys, route_of_unit, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x @ self.lora_A.to(x).T  # (..., n)
        gates = self.router(x, hidden)
        return (hidden * gates) @ self.lora_B.to(x).T


class ArrowRouting:
    """Zero-shot routing over the pooled units of a set of adapters; apply it with `applied(model)`.

    Built by `arrow_routing`. Attributes: `config`, `source_names` (adapter names, the index of
    `unit_source`), `sources` (`[{"name", "weight"}]`, as a `MergedAdapter` records them) and `layers`
    (`{module name: ArrowLayer}`, in module order).
    """

    method = "arrow"

    def __init__(self, config: ArrowConfig, sources: list[dict], layers: dict[str, ArrowLayer]) -> None:
        self.config, self.sources, self.layers = config, sources, layers

    @property
    def source_names(self) -> list[str]:
        return [source["name"] for source in self.sources]

    @property
    def name(self) -> str:
        return self.config.label

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily route `model`'s target layers with forward hooks (removed on exit); yields `model`.

        Raises:
            RoutingError: The model lacks a module the adapters target (another architecture).
        """
        named = dict(model.named_modules())
        missing = [name for name in self.layers if name not in named]
        if missing:
            raise RoutingError(f"the model has no module {missing[0]!r}; the adapters were trained on another architecture.")
        device = next(model.parameters()).device
        handles = []
        try:
            for name, layer in self.layers.items():
                layer.to(device)
                handles.append(named[name].register_forward_hook(_hook(layer)))
            yield model
        finally:
            for handle in handles:
                handle.remove()

    def fingerprint(self) -> str:
        """A content hash of the units and the settings: equal fingerprints route identically."""
        digest = hashlib.sha1(repr((self.config, self.sources)).encode())
        for name, layer in self.layers.items():
            digest.update(name.encode())
            for tensor in (layer.lora_A, layer.lora_B, layer.unit_source):
                digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
        return digest.hexdigest()

    def active_rank(self) -> str:
        """What one token uses, as text: `8 of 48 units` or `top-1 of 6 adapters`."""
        layer = next(iter(self.layers.values()))
        if self.config.granularity == "unit":
            return f"{self.config.top_k} of {layer.lora_A.shape[0]} units"
        return f"top-{self.config.top_k} of {layer.router.n_routes} adapters"


def _hook(layer: ArrowLayer):
    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + layer(inputs[0])

    return hook


def arrow_routing(
    adapters: Sequence[LoraAdapter],
    top_k: int,
    granularity: str = "unit",
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> ArrowRouting:
    """Zero-shot (Arrow-style) routing over the pooled units of `adapters`: a dynamic merge, no training.

    Args:
        adapters: Compatible LoRA adapters for one base model.
        top_k: Routes per token — units (`granularity="unit"`) or adapters (`"adapter"`); at most the
            number of routes of the module that has the fewest.
        granularity: `"unit"`: the top-k units by `|ã_i·x|/‖ã_i‖`, each with gate 1 (k = all units is the
            exact weighted sum). `"adapter"`: the top-k adapters by `|v_t·x|` (`v_t` the top right singular
            vector of `ΔW_t`), weighted by a softmax of those scores, as in Arrow.
        weights: One per adapter (default 1), applied to each adapter's `b̃` as in every merge.
        temperature: Softmax temperature of the adapter weights (adapter granularity).

    Returns:
        An `ArrowRouting`; `with routing.applied(model): ...` runs `model` routed.

    Raises:
        RoutingError: Unknown granularity, k < 1, or k larger than a module's number of routes.
        AdapterError: Incompatible adapters or bad weights.
    """
    config = ArrowConfig(granularity, top_k, temperature)
    adapters = list(adapters)
    check_compatible(adapters)
    tables = adapter_msus(adapters, weights)
    counts = {m: (t.n if granularity == "unit" else len(t.block_ranks())) for m, t in tables.items()}
    fewest = min(counts, key=counts.get)
    if top_k > counts[fewest]:
        what = "units" if granularity == "unit" else "adapters"
        raise RoutingError(
            f"top_k={top_k} exceeds the {counts[fewest]} {what} of module {fewest!r}; choose top_k between 1 and {counts[fewest]}."
        )
    layers = {m: ArrowLayer(t, config) for m, t in tables.items()}
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    return ArrowRouting(config, [{"name": a.name, "weight": w} for a, w in zip(adapters, weights)], layers)
