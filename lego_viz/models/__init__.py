"""Running models: resolving a base (:mod:`~lego_viz.models.base`), running base, adapters and merges
side by side (:mod:`~lego_viz.models.compare`), zero-shot arrow routing over units
(:mod:`~lego_viz.models.arrow`) and merging inside a ``PeftModel`` (:mod:`~lego_viz.models.peft_bridge`).
"""
