"""lego-viz: see, check and tune how LoRA adapters are made of rank-one units, and merge them."""

__version__ = "0.1.0"

# The public names, resolved on first use so that `import lego_viz` stays light (no torch, no peft).
_LAZY = {
    "load_adapter": "lego_viz.adapters",
    "load_adapters": "lego_viz.adapters",
    "export_adapter": "lego_viz.export",
    "check_permutation": "lego_viz.checks.invariance",
    "check_concat_sum": "lego_viz.checks.invariance",
    "arrow_routing": "lego_viz.models.arrow",
    "merge_peft": "lego_viz.models.peft_bridge",
    "adapter_from_peft": "lego_viz.models.peft_bridge",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lego_viz' has no attribute {name!r}")
