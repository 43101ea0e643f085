"""Units: the rank-one MSUs of a LoRA update, their k-means clustering and their 2-D maps.

:mod:`~lego_viz.units.msu` (fold, canonicalise, permute, concatenate), :mod:`~lego_viz.units.gram_kmeans`
(the numpy k-means kernel on Gram matrices), :mod:`~lego_viz.units.kmeans` (its torch-facing API and the
sketch k-means) and :mod:`~lego_viz.units.projection` (UMAP/PCA). Nothing here is imported eagerly.
"""
