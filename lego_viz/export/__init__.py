"""Export: a merged adapter as a PEFT folder (:mod:`~lego_viz.export.folder`) with its report, its
``recipe.yaml`` (:mod:`~lego_viz.export.recipe`, the mergekit-style config parser too), a model card
(:mod:`~lego_viz.export.model_card`) and the serving dtype, rank cap and hub push
(:mod:`~lego_viz.export.serving`).
"""

from lego_viz.export.folder import ExportError, export_adapter, zip_export
from lego_viz.export.recipe import ConfigError, load_config, load_recipe

__all__ = ["ConfigError", "ExportError", "export_adapter", "load_config", "load_recipe", "zip_export"]
