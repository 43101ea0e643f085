"""SMoRA: each rank of a LoRA is an expert; a router activates the top-k ranks per token (ARCHITECTURE §6)."""

from lego_viz.models.arrow import ArrowConfig, ArrowRouting, RoutingError, arrow_routing
from lego_viz.smora.balance import balance_step, mean_load_balance
from lego_viz.smora.config import GATE_MODES, SMoRAConfig
from lego_viz.smora.inject import find_targets, inject_smora, smora_layers, smora_parameters
from lego_viz.smora.io import load_smora, read_smora_config, save_smora, smora_state_dict
from lego_viz.smora.layer import SMoRALinear, SMoRARouter
from lego_viz.smora.routing import balance_update, load_balance, route
from lego_viz.smora.stats import RoutingRecorder, selection_counts, selection_frequency, source_share

__all__ = [
    "GATE_MODES",
    "ArrowConfig",
    "ArrowRouting",
    "RoutingError",
    "RoutingRecorder",
    "SMoRAConfig",
    "SMoRALinear",
    "SMoRARouter",
    "arrow_routing",
    "balance_step",
    "balance_update",
    "find_targets",
    "inject_smora",
    "load_balance",
    "load_smora",
    "mean_load_balance",
    "read_smora_config",
    "route",
    "save_smora",
    "selection_counts",
    "selection_frequency",
    "smora_layers",
    "smora_parameters",
    "smora_state_dict",
    "source_share",
]
