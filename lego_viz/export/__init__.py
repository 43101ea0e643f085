"""Export: a merged adapter as a PEFT folder (:mod:`~lego_viz.export.folder`) with its report, its
``recipe.yaml`` (:mod:`~lego_viz.export.recipe`, the mergekit-style config parser too), a model card
(:mod:`~lego_viz.export.model_card`) and the serving dtype, rank cap and hub push
(:mod:`~lego_viz.export.serving`).
"""

# Resolved on first use: importing one submodule (the numpy-only export path) must not load the others.
_PUBLIC = {
    "ExportError": "lego_viz.export.folder",
    "export_adapter": "lego_viz.export.folder",
    "zip_export": "lego_viz.export.folder",
    "ConfigError": "lego_viz.export.recipe",
    "load_config": "lego_viz.export.recipe",
    "load_recipe": "lego_viz.export.recipe",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lego_viz.export' has no attribute {name!r}")
