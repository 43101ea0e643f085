"""lego-viz: see, check and tune how LoRA adapters are made of rank-one units, and merge them."""

__version__ = "0.1.0"

# The PEFT bridge pulls in torch and peft; `import lego_viz` stays light and resolves these on first use.
_LAZY = {"merge_peft": "lego_viz.peft_bridge", "adapter_from_peft": "lego_viz.peft_bridge"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lego_viz' has no attribute {name!r}")
