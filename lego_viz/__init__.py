"""lego-viz: see, check and tune how LoRA adapters are made of rank-one units, and merge them."""

__version__ = "0.1.0"
